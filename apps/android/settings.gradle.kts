// A single Android library module: `./gradlew :assembleRelease` (see README.md; not built here).
pluginManagement {
    repositories { google(); mavenCentral(); gradlePluginPortal() }
}
dependencyResolutionManagement {
    repositories { google(); mavenCentral(); flatDir { dirs("libs") } }
}
rootProject.name = "tinyalign-runtime"
