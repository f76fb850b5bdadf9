//! Compiles the gRPC definitions with protox (pure Rust), so no `protoc` is needed on the machine,
//! and gives the release link the code layout of `link-order.txt` and packed relocations.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    link_order();
    let fds = protox::compile(
        ["outrider/v1/broker.proto", "echo/v1/echo.proto"],
        ["../protos"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=../protos");
    Ok(())
}

/// Places the functions a running sidecar executes side by side in the release binary
/// (`link-order.txt`, written by `bench/link-order.sh`), so that the code pages it touches, and
/// with them its RSS, are fewer (docs/performance.md § Code layout). lld (Rust's default linker
/// on x86_64 Linux) reads the file; names it does not find are skipped. `OUTRIDER_LINK_ORDER=off`
/// turns both off, e.g. for a linker without `--symbol-ordering-file`.
fn link_order() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=OUTRIDER_LINK_ORDER");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let linux_x86_64 = std::env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = std::env::var("OUTRIDER_LINK_ORDER").is_ok_and(|v| v == "off");
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("link-order.txt");
    if release && linux_x86_64 && !off && file.exists() {
        println!(
            "cargo:rustc-link-arg-bin=outrider=-Wl,--symbol-ordering-file={}",
            file.display()
        );
        println!("cargo:rustc-link-arg-bin=outrider=-Wl,--no-warn-symbol-ordering");
        // Relative relocations packed (DT_RELR, glibc 2.36+): the dynamic loader reads a few KiB
        // instead of 326 KiB of `.rela.dyn` at start-up, pages that stayed in the RSS (0.3 MiB
        // less, `AB_PATH=/16k.bin bench/ab.sh`). Not for static builds (deploy/build-image.sh).
        let static_crt = std::env::var("CARGO_CFG_TARGET_FEATURE")
            .is_ok_and(|f| f.split(',').any(|f| f == "crt-static"));
        if !static_crt {
            println!("cargo:rustc-link-arg-bin=outrider=-Wl,-z,pack-relative-relocs");
        }
    }
}
