// A verified TinyAlign bundle: manifest, ExecuTorch program, memory bank and tokenizer
// (docs/bundle.md, "What a runtime does", step 1). Mirrors tinyalign/runtime/bundle.py.
// Not compiled or run by the project's tests: see README.md.

import CryptoKit
import ExecuTorch
import Foundation
import Tokenizers
import USearch

public enum TinyAlignError: Error, LocalizedError {
  case bundle(String)
  case image(String)
  case promptTooLong(String)
  case program(String)

  public var errorDescription: String? {
    switch self {
    case .bundle(let m), .image(let m), .promptTooLong(let m), .program(let m): return m
    }
  }
}

/// The memory bank: a memory-mapped USearch index of keys, the value rows that feed
/// `rag_connector` and one caption per entry.
public final class MemoryBank {
  public let index: USearchIndex
  public let dim: Int
  public let count: Int
  public let captions: [String]
  let values: [Int64]  // count x valueLength, row-major (caption token ids, -1 = padding)
  let valueLength: Int

  init(folder: URL, valueName: String, expectedFingerprint: String) throws {
    let meta = try readJSON(folder.appendingPathComponent("meta.json"))
    guard (meta["fingerprint"] as? String) == expectedFingerprint else {
      throw TinyAlignError.bundle("the bank's meta.json fingerprint is not the model's: re-export the bundle")
    }
    dim = meta["dim"] as? Int ?? 0
    count = meta["count"] as? Int ?? 0
    let keyDtype = meta["key_dtype"] as? String ?? "f16"
    // The Swift binding searches with float vectors only; i8 banks need per-vector scaled int8
    // queries (see tinyalign/bank.py), so export such bundles with --bank-key-dtype f16.
    let quantization: USearchScalar
    switch keyDtype {
    case "f16": quantization = .f16
    case "f32": quantization = .f32
    default: throw TinyAlignError.bundle("bank keys are \(keyDtype); this sample reads f16 / f32 banks only")
    }
    let settings = meta["index"] as? [String: Any] ?? [:]
    index = USearchIndex.make(metric: .cos, dimensions: UInt32(dim),
                              connectivity: UInt32(settings["connectivity"] as? Int ?? 16), quantization: quantization)
    index.view(path: folder.appendingPathComponent("index.usearch").path)  // memory-mapped, read-only
    // (the binding exposes expansionSearch read-only, so meta.json's expansion_search is not applied)
    guard Int(index.length) == count else {
      throw TinyAlignError.bundle("bank index holds \(index.length) entries but meta.json says \(count)")
    }
    let layout = (meta["values"] as? [String: Any])?[valueName] as? [String: Any]
    guard let file = layout?["file"] as? String else {
      throw TinyAlignError.bundle("the bank has no value array \(valueName)")
    }
    (values, valueLength) = try readNpyIntegers(folder.appendingPathComponent(file), rows: count)
    captions = try JSONSerialization.jsonObject(
      with: Data(contentsOf: folder.appendingPathComponent("captions.json"))) as? [String] ?? []
    guard captions.count == count else { throw TinyAlignError.bundle("captions.json does not hold \(count) captions") }
  }

  /// Top-k entries by cosine similarity, best first: (ids, similarities).
  public func search(_ query: [Float], k: Int) throws -> ([Int], [Float]) {
    let (keys, distances) = try index.search(vector: query, count: k)
    guard keys.count == k else { throw TinyAlignError.program("the bank returned \(keys.count) of \(k) entries") }
    return (keys.map { Int($0) }, distances.map { 1 - $0 })  // cosine distance = 1 - similarity
  }

  func valueRows(_ ids: [Int]) -> [Int64] {
    ids.flatMap { values[($0 * valueLength)..<(($0 + 1) * valueLength)] }
  }
}

public final class TinyAlignBundle {
  public let folder: URL
  public let manifest: [String: Any]
  public let module: Module
  public let tokenizer: Tokenizer
  public let bank: MemoryBank?

  /// Verify every file's size and sha256 against manifest.json, then load the program, the
  /// tokenizer and the bank. Throws TinyAlignError.bundle naming the file that differs.
  public init(folder: URL) throws {
    self.folder = folder
    let m = try readJSON(folder.appendingPathComponent("manifest.json"))
    guard let schema = m["schema_version"] as? Int, schema <= 1 else {
      throw TinyAlignError.bundle("manifest schema_version is newer than this runtime reads (1); update the app")
    }
    guard let files = m["files"] as? [String: [String: Any]] else {
      throw TinyAlignError.bundle("manifest.json has no files table")
    }
    for (rel, info) in files.sorted(by: { $0.key < $1.key }) {
      let url = folder.appendingPathComponent(rel)
      guard FileManager.default.fileExists(atPath: url.path) else {
        throw TinyAlignError.bundle("bundle is missing \(rel); copy it again")
      }
      let size = (try FileManager.default.attributesOfItem(atPath: url.path)[.size] as? NSNumber)?.intValue
      guard size == info["bytes"] as? Int else {
        throw TinyAlignError.bundle("\(rel) has \(size ?? -1) bytes, manifest says \(info["bytes"] ?? "?"): truncated")
      }
      guard try sha256(of: url) == info["sha256"] as? String else {
        throw TinyAlignError.bundle("\(rel) does not match its sha256 in manifest.json")
      }
    }
    manifest = m
    let programs = m["programs"] as? [String: Any]
    guard let pte = programs?["executorch"] as? String, files[pte] != nil,
          let tok = m["tokenizer"] as? String, files[tok] != nil else {
      throw TinyAlignError.bundle("manifest.json does not list the program and the tokenizer among its files")
    }
    module = Module(filePath: folder.appendingPathComponent(pte).path)
    do { try module.load() } catch { throw TinyAlignError.program("cannot load \(pte): \(error)") }

    // tokenizer.json only: swift-transformers wants a tokenizer_config.json as well, so give it
    // the one fact it needs (a byte-level BPE model).
    guard let data = try? JSONSerialization.jsonObject(
      with: Data(contentsOf: folder.appendingPathComponent(tok))) as? [NSString: Any] else {
      throw TinyAlignError.bundle("\(tok) is not a valid tokenizer.json")
    }
    tokenizer = try AutoTokenizer.from(tokenizerConfig: Config(["tokenizer_class": "GPT2Tokenizer"] as [NSString: Any]),
                                       tokenizerData: Config(data))

    let retrieval = m["retrieval"] as? [String: Any] ?? [:]
    if retrieval["enabled"] as? Bool == true {
      guard let b = m["bank"] as? [String: Any], let path = b["path"] as? String,
            let fp = m["fingerprint"] as? String, b["fingerprint"] as? String == fp else {
        throw TinyAlignError.bundle("the bank's fingerprint in manifest.json is not the model's")
      }
      bank = try MemoryBank(folder: folder.appendingPathComponent(path),
                            valueName: retrieval["value_name"] as? String ?? "caption_ids", expectedFingerprint: fp)
    } else {
      bank = nil
    }
  }
}

// ---- helpers ---------------------------------------------------------------------------------------
func readJSON(_ url: URL) throws -> [String: Any] {
  guard let obj = try? JSONSerialization.jsonObject(with: Data(contentsOf: url)) as? [String: Any] else {
    throw TinyAlignError.bundle("\(url.lastPathComponent) is missing or not a JSON object")
  }
  return obj
}

func sha256(of url: URL) throws -> String {
  let handle = try FileHandle(forReadingFrom: url)
  defer { try? handle.close() }
  var hasher = SHA256()
  while let chunk = try handle.read(upToCount: 1 << 20), !chunk.isEmpty { hasher.update(data: chunk) }
  return hasher.finalize().map { String(format: "%02x", $0) }.joined()
}

/// A 2-D little-endian integer .npy (np.save, no pickle) -> (row-major Int64 values, row length).
func readNpyIntegers(_ url: URL, rows: Int) throws -> ([Int64], Int) {
  let data = try Data(contentsOf: url, options: .alwaysMapped)
  guard data.count > 10, data.prefix(6) == Data([0x93] + Array("NUMPY".utf8)) else {
    throw TinyAlignError.bundle("\(url.lastPathComponent) is not a .npy file")
  }
  let major = data[6]
  let headerLen = major == 1 ? Int(data[8]) | Int(data[9]) << 8
                             : Int(data[8]) | Int(data[9]) << 8 | Int(data[10]) << 16 | Int(data[11]) << 24
  let start = major == 1 ? 10 : 12
  let header = String(decoding: data[start..<(start + headerLen)], as: UTF8.self)
  let width: Int
  if header.contains("'<i1'") || header.contains("'|i1'") { width = 1 }
  else if header.contains("'<i2'") { width = 2 }
  else if header.contains("'<i4'") { width = 4 }
  else if header.contains("'<i8'") { width = 8 }
  else { throw TinyAlignError.bundle("\(url.lastPathComponent): unsupported dtype in \(header)") }
  let body = data.suffix(from: data.startIndex + start + headerLen)
  let n = body.count / width
  guard rows > 0, n % rows == 0 else { throw TinyAlignError.bundle("\(url.lastPathComponent) does not hold \(rows) rows") }
  let out: [Int64] = body.withUnsafeBytes { raw in
    (0..<n).map { i in
      switch width {
      case 1: return Int64(raw.load(fromByteOffset: i, as: Int8.self))
      case 2: return Int64(Int16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: Int16.self)))
      case 4: return Int64(Int32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)))
      default: return Int64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self))
      }
    }
  }
  return (out, n / rows)
}
