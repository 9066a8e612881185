//! Builds the kernel programs (agent-ebpf) for the BPF target with the nightly
//! toolchain and bpf-linker, so `cargo build` of the agent embeds them.
//!
//! Every distinct build of the agent (debug, test, clippy, the production
//! build without the test bed) runs this script in an `OUT_DIR` of its own,
//! and aya-build would compile `core` and the programs from scratch in each:
//! about 45 s apiece. They all build the same object, so it is built once in
//! a directory shared by the target directory's builds (serialised by a
//! lock), then copied into this build's `OUT_DIR`.
use std::{fs::File, path::PathBuf};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../agent-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // OUT_DIR is <target>/<profile>/build/<crate>-<hash>/out.
    let shared = out
        .ancestors()
        .nth(4)
        .context("OUT_DIR is not inside a target directory")?
        .join("connscope-ebpf-shared");
    std::fs::create_dir_all(&shared)?;
    let lock = File::create(shared.join("lock"))?;
    lock.lock().context("locking the shared eBPF build")?;
    // SAFETY: build scripts are single-threaded; aya-build reads OUT_DIR
    // from the environment and nothing else runs meanwhile.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    let built = aya_build::build_ebpf(
        [aya_build::Package {
            name: "connscope-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    );
    // SAFETY: as above.
    unsafe { std::env::set_var("OUT_DIR", &out) };
    built?;
    std::fs::copy(shared.join("connscope-ebpf"), out.join("connscope-ebpf"))
        .context("copying the eBPF object into OUT_DIR")?;
    Ok(())
}
