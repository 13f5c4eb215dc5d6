//! Generates the agent API's messages and its ttrpc client and server traits from
//! proto/agent.proto (pure Rust: no protoc needed).
//!
//! The generated files open with inner attributes (`#![allow(...)]`), which
//! `include!` cannot take inside a module; they are dropped here and the crate puts
//! the equivalent `#[allow]`s on the modules that include the files.

fn main() {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    #[cfg(feature = "agent")]
    generate();
}

#[cfg(feature = "agent")]
fn generate() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    ttrpc_codegen::Codegen::new()
        .out_dir(&out)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize::default())
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent API from proto/agent.proto");
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out.join(name);
        let text = std::fs::read_to_string(&path).expect("reading generated code");
        let kept: Vec<&str> = text.lines().filter(|l| !l.trim_start().starts_with("#![") && !l.trim_start().starts_with("//!")).collect();
        std::fs::write(&path, kept.join("\n")).expect("writing generated code");
    }
}
