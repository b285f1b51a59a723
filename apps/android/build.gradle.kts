// TinyAlign runtime for Android: loads a TinyAlign bundle (docs/bundle.md) and answers questions about
// images on device with ExecuTorch (model.pte), USearch (the memory bank) and DJL's binding of
// Hugging Face tokenizers (tokenizer.json). Not built by the project's tests: see README.md.
plugins {
    id("com.android.library") version "8.5.2"
    id("org.jetbrains.kotlin.android") version "2.0.21"
}

android {
    namespace = "org.tinyalign.runtime"
    compileSdk = 35
    defaultConfig {
        minSdk = 26
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
}

dependencies {
    // Match the executorch version that exported the bundle (manifest.environment.executorch).
    implementation("org.pytorch:executorch-android:1.5.1")
    implementation("com.facebook.soloader:soloader:0.10.5")
    implementation("com.facebook.fbjni:fbjni:0.7.0")
    // USearch's Java binding is not on Maven Central: put usearch-<version>.jar from its GitHub
    // release (a "fat" jar with the Android .so files) into libs/.
    implementation(files("libs/usearch-2.21.0.jar"))
    implementation("ai.djl.huggingface:tokenizers:0.33.0")
    runtimeOnly("ai.djl.android:tokenizer-native:0.33.0")
    implementation("androidx.exifinterface:exifinterface:1.3.7")
}
