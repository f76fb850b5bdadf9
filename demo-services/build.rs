//! Compiles the runner <-> tester gRPC definitions with protox (pure Rust, no `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["learning/v1/testing.proto"], ["../protos"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=../protos/learning");
    Ok(())
}
