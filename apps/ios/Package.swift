// swift-tools-version:5.9
// TinyAlignRuntime: load a TinyAlign bundle (docs/bundle.md) and answer questions about images on
// device, with ExecuTorch (the bundle's model.pte), USearch (the memory bank) and swift-transformers'
// Tokenizers (tokenizer.json). See README.md for what has and has not been built or tested.
import PackageDescription

let package = Package(
  name: "TinyAlignRuntime",
  platforms: [.iOS(.v17), .macOS(.v14)],
  products: [
    .library(name: "TinyAlignRuntime", targets: ["TinyAlignRuntime"]),
  ],
  dependencies: [
    // Use the swiftpm-<version> branch that matches the executorch version that exported the bundle
    // (manifest.environment.executorch, 1.5.1 for this kit).
    .package(url: "https://github.com/pytorch/executorch.git", branch: "swiftpm-1.5.1"),
    .package(url: "https://github.com/unum-cloud/usearch.git", from: "2.21.0"),
    .package(url: "https://github.com/huggingface/swift-transformers.git", from: "1.3.0"),
  ],
  targets: [
    .target(
      name: "TinyAlignRuntime",
      dependencies: [
        .product(name: "executorch", package: "executorch"),
        // ios / macos bundles are lowered to the Core ML delegate, android / desktop ones to XNNPACK;
        // the quantized kernels serve the 8da4w preset's int8 token table.
        .product(name: "backend_coreml", package: "executorch"),
        .product(name: "backend_xnnpack", package: "executorch"),
        .product(name: "kernels_optimized", package: "executorch"),
        .product(name: "kernels_quantized", package: "executorch"),
        .product(name: "USearch", package: "usearch"),
        .product(name: "Tokenizers", package: "swift-transformers"),
      ],
      linkerSettings: [
        // ExecuTorch backends and kernels register themselves from static initializers.
        .unsafeFlags(["-Wl,-all_load"]),
      ]
    ),
  ]
)
