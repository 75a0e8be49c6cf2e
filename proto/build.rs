//! Compiles every `.proto` under this crate with protox (pure Rust), so a fresh machine needs no protoc.

const PROTOS: &[&str] = &[
    "parley/user/v1/user.proto",
    "parley/chat/v1/chat.proto",
    "parley/quota/v1/quota.proto",
    "parley/analytics/v1/analytics.proto",
    "parley/agent/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let file_descriptors = protox::compile(PROTOS, ["."])?;
    // Every client and server encodes with `crate::codec::Codec` (prost with smaller buffers).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(file_descriptors)?;
    Ok(())
}
