//! Links the `offload-worker` binary with packed relative relocations
//! (DT_RELR) where the toolchain targets glibc on Linux. The binary is
//! position-independent (ASLR matters in the process that parses hostile
//! input), and in the default format its half-megabyte relocation table is
//! read at every start: a third of an idle worker's resident memory budget.
//! Packed, the table is a few kilobytes. Linkers without the option ignore
//! it, and it only takes effect against a C library that supports it.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
