//! Compiles the gRPC definitions with protox (pure Rust), so no `protoc` is needed on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
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
