//! The BPF-target half of the crate (see the crate docs in `main.rs`): one
//! module per hook family, each holding only its programs' entry points and
//! what nothing else uses, over the shared modules below.
//!
//! The agent finds programs, maps and the `CONFIG` global by their ELF
//! symbol names: the program macros make their functions `#[no_mangle]`,
//! `#[map]` sets a map's export name and `CONFIG` is `#[no_mangle]`, so no
//! name depends on the module an item lives in (nor on Rust visibility).

// Shared by the hook families.
mod common;
mod emit;
mod maps;

// One per hook family.
mod cgroup;
mod connect;
mod connect_btf;
mod reset;
mod sched;
mod sock_state;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program in which a panic is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
