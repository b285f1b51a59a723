// Image + question -> streamed answer, in the order of docs/bundle.md ("What a runtime does"):
// preprocess, prompt ids, vision_encoder, retrieval_query, bank search, rag_connector, assemble,
// prefill, decode with the KV cache. Mirrors tinyalign/runtime/engine.py.
// Not compiled or run by the project's tests: see README.md.

import CoreGraphics
import ExecuTorch
import Foundation
import ImageIO
import Tokenizers

public struct Memory { public let id: Int; public let caption: String; public let similarity: Float }

public struct Answer {
  public let text: String
  public let tokenIds: [Int]
  public let memories: [Memory]
  public let promptTokens: Int
  public let seconds: [String: Double]  // encode, retrieve, prefill, decode (all tokens), total
}

public final class TinyAlignEngine {
  let bundle: TinyAlignBundle
  let size: Int, mean: [Float], std: [Float], maxPixels: Int
  let maxSeqLen: Int, imageTokens: Int, memoryLen: Int, k: Int
  let bosId: Int?, eosIds: Set<Int>

  public init(bundle: TinyAlignBundle) {
    self.bundle = bundle
    let m = bundle.manifest
    let image = m["image"] as? [String: Any] ?? [:]
    size = image["size"] as? Int ?? 0
    mean = (image["mean"] as? [Double] ?? [0, 0, 0]).map(Float.init)
    std = (image["std"] as? [Double] ?? [1, 1, 1]).map(Float.init)
    maxPixels = image["max_pixels"] as? Int ?? 40_000_000
    maxSeqLen = m["max_seq_len"] as? Int ?? 0
    imageTokens = (m["model"] as? [String: Any])?["image_tokens"] as? Int ?? 0
    let r = m["retrieval"] as? [String: Any] ?? [:]
    let retrieval = (r["enabled"] as? Bool ?? false) && bundle.bank != nil
    memoryLen = retrieval ? (r["memory_len"] as? Int ?? 0) : 0
    k = retrieval ? (r["k"] as? Int ?? 0) : 0
    let sp = m["special_tokens"] as? [String: Any] ?? [:]
    bosId = sp["bos_id"] as? Int
    eosIds = Set(sp["eos_ids"] as? [Int] ?? [])
  }

  // ---- step 3: prompt ids ------------------------------------------------------------------------
  func promptIds(_ question: String) -> ([Int], [Int]) {
    let t = bundle.manifest["template"] as? [String: Any] ?? [:]
    var values = t.compactMapValues { $0 as? String }
    values["question"] = question.trimmingCharacters(in: .whitespacesAndNewlines)
    func render(_ s: String) -> String {  // one pass over "{name}" placeholders
      var out = "", rest = Substring(s)
      while let open = rest.firstIndex(of: "{"), let close = rest[open...].firstIndex(of: "}") {
        out += rest[..<open]
        let name = String(rest[rest.index(after: open)..<close])
        out += values[name] ?? "{\(name)}"
        rest = rest[rest.index(after: close)...]
      }
      return out + rest
    }
    let before = render(t["before_image"] as? String ?? "{system}{user_prefix}")
    let after = render(t["after_image"] as? String ?? "\n{question}{user_suffix}{assistant_prefix}")
    let tok = bundle.tokenizer
    return ((bosId.map { [$0] } ?? []) + tok.encode(text: before, addSpecialTokens: false),
            tok.encode(text: after, addSpecialTokens: false))
  }

  // ---- step 2: preprocess ---------------------------------------------------------------------------
  /// Decode with EXIF orientation, composite onto white, resize to size x size, (x/255 - mean)/std,
  /// CHW float32. The resize is Core Graphics' high-quality interpolation, not Pillow's bicubic, so
  /// pixels differ slightly from the Python runtime (see README.md).
  public func preprocess(imageAt url: URL) throws -> [Float] {
    guard let src = CGImageSourceCreateWithURL(url as CFURL, nil),
          let props = CGImageSourceCopyPropertiesAtIndex(src, 0, nil) as? [CFString: Any],
          let w = props[kCGImagePropertyPixelWidth] as? Int, let h = props[kCGImagePropertyPixelHeight] as? Int else {
      throw TinyAlignError.image("\(url.lastPathComponent) is not an image this device can read")
    }
    guard w * h <= maxPixels else {
      throw TinyAlignError.image("image is \(w)x\(h), more than \(maxPixels) pixels (decompression-bomb guard)")
    }
    let opts: [CFString: Any] = [kCGImageSourceCreateThumbnailFromImageAlways: true,
                                 kCGImageSourceCreateThumbnailWithTransform: true,  // EXIF orientation
                                 kCGImageSourceThumbnailMaxPixelSize: max(w, h),
                                 kCGImageSourceShouldCacheImmediately: true]
    guard let image = CGImageSourceCreateThumbnailAtIndex(src, 0, opts as CFDictionary) else {
      throw TinyAlignError.image("\(url.lastPathComponent) could not be decoded (corrupt or truncated)")
    }
    let S = size
    var rgba = [UInt8](repeating: 255, count: S * S * 4)
    let drawn: Bool = rgba.withUnsafeMutableBytes { buf in
      guard let ctx = CGContext(data: buf.baseAddress, width: S, height: S, bitsPerComponent: 8, bytesPerRow: 4 * S,
                                space: CGColorSpace(name: CGColorSpace.sRGB)!,
                                bitmapInfo: CGImageAlphaInfo.premultipliedLast.rawValue) else { return false }
      ctx.setFillColor(CGColor(red: 1, green: 1, blue: 1, alpha: 1))  // transparency -> white
      ctx.fill(CGRect(x: 0, y: 0, width: S, height: S))
      ctx.interpolationQuality = .high
      ctx.draw(image, in: CGRect(x: 0, y: 0, width: S, height: S))  // stretched, no crop
      return true
    }
    guard drawn else { throw TinyAlignError.image("cannot draw the image") }
    var chw = [Float](repeating: 0, count: 3 * S * S)
    for c in 0..<3 {
      for i in 0..<(S * S) { chw[c * S * S + i] = (Float(rgba[4 * i + c]) / 255 - mean[c]) / std[c] }
    }
    return chw
  }

  // ---- the program ------------------------------------------------------------------------------------
  func run(_ method: String, _ inputs: [ValueConvertible]) throws -> [Tensor<Float>] {
    do {
      let outs: [Value] = try bundle.module.execute(method, inputs)
      return outs.compactMap { $0.tensor() as Tensor<Float>? }
    } catch {
      throw TinyAlignError.program("ExecuTorch method \(method) failed: \(error)")
    }
  }

  func embed(_ ids: [Int]) throws -> [Float] {
    try run("token_embedding", [Tensor<Int64>(ids.map(Int64.init), shape: [1, ids.count])])[0].scalars()
  }

  /// Answer `question` about the image at `imageURL`; `stream` receives each new piece of text.
  public func ask(imageURL: URL, question: String, maxNewTokens: Int = 32, temperature: Float = 0, topP: Float = 1,
                  seed: UInt64? = nil, stream: ((String) -> Void)? = nil) throws -> Answer {
    let t0 = Date()
    var seconds: [String: Double] = [:]
    let (before, after) = promptIds(question)  // step 3 first: the length check precedes any work
    let P = before.count + after.count + imageTokens + memoryLen
    guard P < maxSeqLen else {
      throw TinyAlignError.promptTooLong("the prompt needs \(P) positions but the model's maximum is \(maxSeqLen)")
    }
    let pixels = try preprocess(imageAt: imageURL)  // step 2
    var t = Date()
    let vision = try run("vision_encoder", [Tensor<Float>(pixels, shape: [1, 3, size, size])])  // step 4
    let imageTokensOut = vision[0].scalars(), feats = vision[1]
    seconds["encode"] = Date().timeIntervalSince(t)

    var memories: [Memory] = [], memoryTokens: [Float] = []
    if let bank = bundle.bank, k > 0 {  // steps 5-7
      t = Date()
      let full = (before + [-200] + after).map(Int64.init)
      let query = try run("retrieval_query", [feats, Tensor<Int64>(full, shape: [1, full.count]),
                                              Tensor<Int64>([Int64](repeating: 1, count: full.count),
                                                            shape: [1, full.count])])[0].scalars()
      let (ids, sims) = try bank.search(query, k: k)
      let values = bank.valueRows(ids)
      memoryTokens = try run("rag_connector", [Tensor<Int64>(values, shape: [1, k, bank.valueLength])])[0].scalars()
      memories = zip(ids, sims).map { Memory(id: $0.0, caption: bank.captions[$0.0], similarity: $0.1) }
      seconds["retrieve"] = Date().timeIntervalSince(t)
    }
    t = Date()  // steps 8-9: assemble [before, image, memory, after] along the sequence axis; prefill
    let head: [Float] = try before.isEmpty ? [] : embed(before)
    let tail: [Float] = try after.isEmpty ? [] : embed(after)
    let prefix = head + imageTokensOut + memoryTokens + tail
    let H = prefix.count / P
    var logits = try run("text_decoder", [Tensor<Float>(prefix, shape: [1, P, H]),
                                          Tensor<Int64>((0..<P).map(Int64.init), shape: [P])])[0].scalars()
    seconds["prefill"] = Date().timeIntervalSince(t)

    t = Date()  // step 10: decode with the KV cache
    var rng = SplitMix64(seed: seed ?? UInt64.random(in: 0...UInt64.max))
    var out: [Int] = [], shown = ""
    let budget = min(maxNewTokens, maxSeqLen - P)
    for step in 0..<budget {
      let next = sample(logits, temperature: temperature, topP: topP, rng: &rng)
      if eosIds.contains(next) { break }
      out.append(next)
      let text = bundle.tokenizer.decode(tokens: out, skipSpecialTokens: true)
      if !text.hasSuffix("\u{FFFD}"), text.hasPrefix(shown), text.count > shown.count {
        stream?(String(text.dropFirst(shown.count)))
        shown = text
      }
      if step == budget - 1 { break }
      let embedded = try embed([next])
      logits = try run("text_decoder", [Tensor<Float>(embedded, shape: [1, 1, H]),
                                        Tensor<Int64>([Int64(P + step)], shape: [1])])[0].scalars()
    }
    seconds["decode"] = Date().timeIntervalSince(t)
    seconds["total"] = Date().timeIntervalSince(t0)
    let text = bundle.tokenizer.decode(tokens: out, skipSpecialTokens: true)
    return Answer(text: text.trimmingCharacters(in: .whitespacesAndNewlines), tokenIds: out, memories: memories,
                  promptTokens: P, seconds: seconds)
  }
}

/// Greedy (temperature 0) or softmax(logits / T) with nucleus top-p filtering.
func sample(_ logits: [Float], temperature: Float, topP: Float, rng: inout SplitMix64) -> Int {
  guard temperature > 0 else { return logits.indices.max { logits[$0] < logits[$1] } ?? 0 }
  let m = logits.max() ?? 0
  var p = logits.map { Double(exp(($0 - m) / temperature)) }
  let total = p.reduce(0, +)
  p = p.map { $0 / total }
  if topP < 1 {
    var kept = 0.0
    var keep = Set<Int>()
    for i in p.indices.sorted(by: { p[$0] > p[$1] }) where kept < Double(topP) { keep.insert(i); kept += p[i] }
    p = p.indices.map { keep.contains($0) ? p[$0] : 0 }
  }
  var r = Double(rng.next() >> 11) / Double(1 << 53) * p.reduce(0, +)
  for (i, q) in p.enumerated() { r -= q; if r <= 0 { return i } }
  return p.lastIndex { $0 > 0 } ?? 0
}

struct SplitMix64: RandomNumberGenerator {
  var state: UInt64
  init(seed: UInt64) { state = seed }
  mutating func next() -> UInt64 {
    state &+= 0x9E37_79B9_7F4A_7C15
    var z = state
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
  }
}
