// A verified TinyAlign bundle: manifest, ExecuTorch program, memory bank and tokenizer
// (docs/bundle.md, "What a runtime does", step 1). Mirrors tinyalign/runtime/bundle.py.
// Not compiled or run by the project's tests: see README.md.
package org.tinyalign.runtime

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer
import cloud.unum.usearch.Index
import org.json.JSONArray
import org.json.JSONObject
import org.pytorch.executorch.Module
import java.io.File
import java.io.RandomAccessFile
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import java.nio.file.Paths
import java.security.MessageDigest

class BundleException(message: String) : Exception(message)
class ImageException(message: String) : Exception(message)
class PromptTooLongException(message: String) : Exception(message)

/** The memory bank: a memory-mapped USearch index, the value rows for `rag_connector`, captions. */
class MemoryBank(folder: File, valueName: String, expectedFingerprint: String) : AutoCloseable {
    val dim: Int
    val count: Int
    val captions: List<String>
    val valueLength: Int
    private val values: LongArray // count x valueLength, row-major (caption ids, -1 = padding)
    private val index: Index

    init {
        val meta = JSONObject(File(folder, "meta.json").readText())
        if (meta.optString("fingerprint") != expectedFingerprint) {
            throw BundleException("the bank's meta.json fingerprint is not the model's: re-export the bundle")
        }
        dim = meta.getInt("dim")
        count = meta.getInt("count")
        val keyDtype = meta.optString("key_dtype", "f16")
        // i8 banks need per-vector scaled int8 queries (tinyalign/bank.py); this sample reads f16 / f32.
        if (keyDtype != "f16" && keyDtype != "f32") {
            throw BundleException("bank keys are $keyDtype; this sample reads f16 / f32 banks (--bank-key-dtype f16)")
        }
        index = Index.viewFromPath(File(folder, "index.usearch").path) // memory-mapped, read-only
        if (index.size() != count.toLong()) {
            throw BundleException("bank index holds ${index.size()} entries but meta.json says $count")
        }
        val file = meta.getJSONObject("values").optJSONObject(valueName)?.getString("file")
            ?: throw BundleException("the bank has no value array $valueName")
        val (v, len) = readNpyIntegers(File(folder, file), count)
        values = v
        valueLength = len
        val caps = JSONArray(File(folder, "captions.json").readText())
        captions = List(caps.length()) { caps.getString(it) }
        if (captions.size != count) throw BundleException("captions.json does not hold $count captions")
    }

    /** Top-k entry ids, best first, with their cosine similarities (computed from the stored keys,
     *  since the Java binding returns keys only). */
    fun search(query: FloatArray, k: Int): Pair<LongArray, FloatArray> {
        val ids = index.search(query, k.toLong())
        if (ids.size != k) throw IllegalStateException("the bank returned ${ids.size} of $k entries")
        val qn = Math.sqrt(query.fold(0.0) { a, x -> a + x * x }).toFloat()
        val sims = FloatArray(k) { i ->
            val key = index.get(ids[i])
            var dot = 0f
            var kn = 0f
            for (d in key.indices) { dot += key[d] * query[d]; kn += key[d] * key[d] }
            dot / (Math.sqrt(kn.toDouble()).toFloat() * qn)
        }
        return ids to sims
    }

    fun valueRows(ids: LongArray): LongArray = LongArray(ids.size * valueLength) { i ->
        values[ids[i / valueLength].toInt() * valueLength + i % valueLength]
    }

    override fun close() = index.close()
}

class TinyAlignBundle(val folder: File) : AutoCloseable {
    val manifest: JSONObject
    val module: Module
    val tokenizer: HuggingFaceTokenizer
    val bank: MemoryBank?

    init {
        val mf = File(folder, "manifest.json")
        if (!mf.isFile) throw BundleException("$folder has no manifest.json")
        val m = JSONObject(mf.readText())
        if (m.optInt("schema_version", 99) > 1) {
            throw BundleException("manifest schema_version is newer than this runtime reads (1); update the app")
        }
        val files = m.getJSONObject("files")
        for (rel in files.keys().asSequence().sorted()) {
            val info = files.getJSONObject(rel)
            val f = File(folder, rel)
            if (!f.isFile) throw BundleException("bundle is missing $rel; copy it again")
            if (f.length() != info.getLong("bytes")) {
                throw BundleException("$rel has ${f.length()} bytes, manifest says ${info.getLong("bytes")}: truncated")
            }
            if (sha256(f) != info.getString("sha256")) {
                throw BundleException("$rel does not match its sha256 in manifest.json")
            }
        }
        manifest = m
        val pte = m.getJSONObject("programs").getString("executorch")
        val tok = m.getString("tokenizer")
        if (!files.has(pte) || !files.has(tok)) {
            throw BundleException("manifest.json does not list the program and the tokenizer among its files")
        }
        if (m.optString("backend") == "coreml") {
            throw BundleException("this bundle is for ${m.optString("target")} (Core ML); export with --target android")
        }
        module = Module.load(File(folder, pte).path, Module.LOAD_MODE_MMAP)
        tokenizer = HuggingFaceTokenizer.newInstance(Paths.get(File(folder, tok).path))
        val retrieval = m.getJSONObject("retrieval")
        bank = if (retrieval.optBoolean("enabled")) {
            val b = m.getJSONObject("bank")
            val fp = m.getString("fingerprint")
            if (b.optString("fingerprint") != fp) {
                throw BundleException("the bank's fingerprint in manifest.json is not the model's")
            }
            MemoryBank(File(folder, b.getString("path")), retrieval.optString("value_name", "caption_ids"), fp)
        } else null
    }

    override fun close() {
        bank?.close()
        tokenizer.close()
        module.destroy()
    }
}

internal fun sha256(f: File): String {
    val md = MessageDigest.getInstance("SHA-256")
    f.inputStream().use { s ->
        val buf = ByteArray(1 shl 20)
        while (true) {
            val n = s.read(buf)
            if (n < 0) break
            md.update(buf, 0, n)
        }
    }
    return md.digest().joinToString("") { "%02x".format(it) }
}

/** A 2-D little-endian integer .npy (np.save, no pickle) -> (row-major values, row length). */
internal fun readNpyIntegers(f: File, rows: Int): Pair<LongArray, Int> {
    val buf: ByteBuffer = RandomAccessFile(f, "r").use { it.channel.map(FileChannel.MapMode.READ_ONLY, 0, it.length()) }
    buf.order(ByteOrder.LITTLE_ENDIAN)
    val magic = ByteArray(6).also { buf.get(it) }
    if (magic[0] != 0x93.toByte() || String(magic, 1, 5, Charsets.US_ASCII) != "NUMPY") {
        throw BundleException("${f.name} is not a .npy file")
    }
    val major = buf.get().toInt()
    buf.get() // minor
    val headerLen = if (major == 1) buf.short.toInt() and 0xffff else buf.int
    val header = ByteArray(headerLen).also { buf.get(it) }.toString(Charsets.US_ASCII)
    val width = when {
        "'<i1'" in header || "'|i1'" in header -> 1
        "'<i2'" in header -> 2
        "'<i4'" in header -> 4
        "'<i8'" in header -> 8
        else -> throw BundleException("${f.name}: unsupported dtype in $header")
    }
    val n = buf.remaining() / width
    if (rows <= 0 || n % rows != 0) throw BundleException("${f.name} does not hold $rows rows")
    val out = LongArray(n) {
        when (width) {
            1 -> buf.get().toLong()
            2 -> buf.short.toLong()
            4 -> buf.int.toLong()
            else -> buf.long
        }
    }
    return out to n / rows
}
