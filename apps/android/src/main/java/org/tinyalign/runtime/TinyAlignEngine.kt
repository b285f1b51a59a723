// Image + question -> streamed answer, in the order of docs/bundle.md ("What a runtime does"):
// preprocess, prompt ids, vision_encoder, retrieval_query, bank search, rag_connector, assemble,
// prefill, decode with the KV cache. Mirrors tinyalign/runtime/engine.py.
// Not compiled or run by the project's tests: see README.md.
package org.tinyalign.runtime

import android.graphics.Bitmap
import android.graphics.BitmapFactory
import android.graphics.Canvas
import android.graphics.Color
import android.graphics.Matrix
import android.graphics.Paint
import android.graphics.Rect
import androidx.exifinterface.media.ExifInterface
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Tensor
import java.io.File
import kotlin.math.exp
import kotlin.random.Random

data class Memory(val id: Long, val caption: String, val similarity: Float)

data class Answer(
    val text: String,
    val tokenIds: List<Long>,
    val memories: List<Memory>,
    val promptTokens: Int,
    val millis: Map<String, Double>, // encode, retrieve, prefill, decode (all tokens), total
)

class TinyAlignEngine(private val bundle: TinyAlignBundle) {
    private val m = bundle.manifest
    private val image = m.getJSONObject("image")
    private val size = image.getInt("size")
    private val mean = FloatArray(3) { image.getJSONArray("mean").getDouble(it).toFloat() }
    private val std = FloatArray(3) { image.getJSONArray("std").getDouble(it).toFloat() }
    private val maxPixels = image.optLong("max_pixels", 40_000_000L)
    private val maxSeqLen = m.getInt("max_seq_len")
    private val imageTokens = m.getJSONObject("model").getInt("image_tokens")
    private val retrieval = m.getJSONObject("retrieval")
    private val k = if (retrieval.optBoolean("enabled") && bundle.bank != null) retrieval.getInt("k") else 0
    private val memoryLen = if (k > 0) retrieval.getInt("memory_len") else 0
    private val special = m.getJSONObject("special_tokens")
    private val bosId: Long? = if (special.isNull("bos_id")) null else special.getLong("bos_id")
    private val eosIds = special.getJSONArray("eos_ids").let { a -> (0 until a.length()).map { a.getLong(it) }.toSet() }

    // ---- step 3: prompt ids -----------------------------------------------------------------------
    fun promptIds(question: String): Pair<LongArray, LongArray> {
        val t = m.getJSONObject("template")
        val values = t.keys().asSequence().associateWith { t.opt(it) as? String ?: "" } +
            ("question" to question.trim())
        // one pass over "{name}" placeholders, so braces inside the values stay as they are
        fun render(s: String) = Regex("\\{(\\w+)\\}").replace(s) { values[it.groupValues[1]] ?: it.value }
        val before = render(t.optString("before_image", "{system}{user_prefix}"))
        val after = render(t.optString("after_image", "\n{question}{user_suffix}{assistant_prefix}"))
        val tok = bundle.tokenizer
        val head = (if (bosId != null) longArrayOf(bosId) else longArrayOf()) + tok.encode(before, false, false).ids
        return head to tok.encode(after, false, false).ids
    }

    // ---- step 2: preprocess ------------------------------------------------------------------------
    /** Decode with EXIF orientation, composite onto white, resize to size x size, (x/255 - mean)/std,
     *  CHW float32. The resize is Android's bilinear filter, not Pillow's bicubic, so pixels differ
     *  slightly from the Python runtime (see README.md). */
    fun preprocess(file: File): FloatArray {
        val bounds = BitmapFactory.Options().apply { inJustDecodeBounds = true }
        BitmapFactory.decodeFile(file.path, bounds)
        if (bounds.outWidth <= 0 || bounds.outHeight <= 0) throw ImageException("${file.name} is not a readable image")
        if (bounds.outWidth.toLong() * bounds.outHeight > maxPixels) {
            throw ImageException("image is ${bounds.outWidth}x${bounds.outHeight}, over $maxPixels pixels (bomb guard)")
        }
        var bmp = BitmapFactory.decodeFile(file.path)
            ?: throw ImageException("${file.name} could not be decoded (corrupt or truncated)")
        val degrees = runCatching { ExifInterface(file.path).rotationDegrees }.getOrDefault(0)
        val flipped = runCatching { ExifInterface(file.path).isFlipped }.getOrDefault(false)
        if (degrees != 0 || flipped) {
            val mat = Matrix().apply { if (flipped) postScale(-1f, 1f); postRotate(degrees.toFloat()) }
            bmp = Bitmap.createBitmap(bmp, 0, 0, bmp.width, bmp.height, mat, true)
        }
        val rgb = Bitmap.createBitmap(bmp.width, bmp.height, Bitmap.Config.ARGB_8888)
        Canvas(rgb).apply {
            drawColor(Color.WHITE) // transparency -> white, then resize (as Pillow: composite, then resize)
            drawBitmap(bmp, null, Rect(0, 0, bmp.width, bmp.height), Paint(Paint.FILTER_BITMAP_FLAG))
        }
        val small = Bitmap.createScaledBitmap(rgb, size, size, true) // stretched, no crop
        val px = IntArray(size * size).also { small.getPixels(it, 0, size, 0, 0, size, size) }
        val out = FloatArray(3 * size * size)
        for (i in px.indices) {
            val c = px[i]
            out[i] = (((c shr 16) and 0xff) / 255f - mean[0]) / std[0]
            out[size * size + i] = (((c shr 8) and 0xff) / 255f - mean[1]) / std[1]
            out[2 * size * size + i] = ((c and 0xff) / 255f - mean[2]) / std[2]
        }
        return out
    }

    // ---- the program ---------------------------------------------------------------------------------
    private fun run(method: String, vararg inputs: Tensor): Array<EValue> =
        bundle.module.execute(method, *inputs.map { EValue.from(it) }.toTypedArray())

    private fun embed(ids: LongArray): FloatArray =
        run("token_embedding", Tensor.fromBlob(ids, longArrayOf(1, ids.size.toLong())))[0].toTensor().dataAsFloatArray

    /** Answer [question] about [imageFile]; [stream] receives each new piece of answer text. */
    fun ask(
        imageFile: File, question: String, maxNewTokens: Int = 32, temperature: Float = 0f, topP: Float = 1f,
        seed: Long? = null, stream: ((String) -> Unit)? = null,
    ): Answer {
        val t0 = System.nanoTime()
        val ms = mutableMapOf<String, Double>()
        val (before, after) = promptIds(question) // step 3 first: the length check precedes any work
        val p = before.size + after.size + imageTokens + memoryLen
        if (p >= maxSeqLen) throw PromptTooLongException("the prompt needs $p positions but the maximum is $maxSeqLen")
        val pixels = preprocess(imageFile) // step 2
        var t = System.nanoTime()
        val vision = run("vision_encoder", Tensor.fromBlob(pixels, longArrayOf(1, 3, size.toLong(), size.toLong())))
        val imageTok = vision[0].toTensor().dataAsFloatArray
        val feats = vision[1].toTensor()
        ms["encode"] = (System.nanoTime() - t) / 1e6

        var memories = emptyList<Memory>()
        var memoryTokens = FloatArray(0)
        val bank = bundle.bank
        if (bank != null && k > 0) { // steps 5-7
            t = System.nanoTime()
            val full = before + longArrayOf(-200L) + after
            val shape = longArrayOf(1, full.size.toLong())
            val query = run("retrieval_query", feats, Tensor.fromBlob(full, shape),
                Tensor.fromBlob(LongArray(full.size) { 1L }, shape))[0].toTensor().dataAsFloatArray
            val (ids, sims) = bank.search(query, k)
            val values = Tensor.fromBlob(bank.valueRows(ids), longArrayOf(1, k.toLong(), bank.valueLength.toLong()))
            memoryTokens = run("rag_connector", values)[0].toTensor().dataAsFloatArray
            memories = ids.indices.map { Memory(ids[it], bank.captions[ids[it].toInt()], sims[it]) }
            ms["retrieve"] = (System.nanoTime() - t) / 1e6
        }
        t = System.nanoTime() // steps 8-9: assemble [before, image, memory, after]; prefill
        val prefix = (if (before.isNotEmpty()) embed(before) else FloatArray(0)) + imageTok + memoryTokens +
            (if (after.isNotEmpty()) embed(after) else FloatArray(0))
        val h = prefix.size / p
        var logits = run("text_decoder", Tensor.fromBlob(prefix, longArrayOf(1, p.toLong(), h.toLong())),
            Tensor.fromBlob(LongArray(p) { it.toLong() }, longArrayOf(p.toLong())))[0].toTensor().dataAsFloatArray
        ms["prefill"] = (System.nanoTime() - t) / 1e6

        t = System.nanoTime() // step 10: decode with the KV cache
        val rng = if (seed != null) Random(seed) else Random.Default
        val out = ArrayList<Long>()
        var shown = ""
        val budget = minOf(maxNewTokens, maxSeqLen - p)
        for (step in 0 until budget) {
            val next = sample(logits, temperature, topP, rng)
            if (next in eosIds) break
            out.add(next)
            val text = bundle.tokenizer.decode(out.toLongArray(), true)
            if (!text.endsWith("\uFFFD") && text.startsWith(shown) && text.length > shown.length) {
                stream?.invoke(text.substring(shown.length))
                shown = text
            }
            if (step == budget - 1) break
            logits = run("text_decoder", Tensor.fromBlob(embed(longArrayOf(next)), longArrayOf(1, 1, h.toLong())),
                Tensor.fromBlob(longArrayOf((p + step).toLong()), longArrayOf(1)))[0].toTensor().dataAsFloatArray
        }
        ms["decode"] = (System.nanoTime() - t) / 1e6
        ms["total"] = (System.nanoTime() - t0) / 1e6
        val text = bundle.tokenizer.decode(out.toLongArray(), true).trim()
        return Answer(text, out, memories, p, ms)
    }
}

/** Greedy (temperature 0) or softmax(logits / T) with nucleus top-p filtering. */
internal fun sample(logits: FloatArray, temperature: Float, topP: Float, rng: Random): Long {
    if (temperature <= 0f) return logits.indices.maxByOrNull { logits[it] }!!.toLong() // first maximum
    val mx = logits.max()
    val p = DoubleArray(logits.size) { exp(((logits[it] - mx) / temperature).toDouble()) }
    val total = p.sum()
    for (i in p.indices) p[i] /= total
    if (topP < 1f) {
        var kept = 0.0
        val keep = BooleanArray(p.size)
        for (i in p.indices.sortedByDescending { p[it] }) {
            if (kept >= topP) break
            keep[i] = true
            kept += p[i]
        }
        for (i in p.indices) if (!keep[i]) p[i] = 0.0
    }
    var r = rng.nextDouble() * p.sum()
    for (i in p.indices) { r -= p[i]; if (r <= 0) return i.toLong() }
    return p.indices.last { p[it] > 0 }.toLong()
}
