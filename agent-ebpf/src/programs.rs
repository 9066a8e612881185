//! The BPF-target half of the crate (see the crate docs in `main.rs`): one
//! module per hook family, each holding only its programs' entry points and
//! what nothing else uses, over the shared modules below.
//!
//! Program and map names are the ELF symbols the agent loads by name: the
//! program macros make their functions `#[no_mangle]` and `#[map]` sets the
//! export name, so neither depends on where in these modules an item lives.

// Shared by the hook families.
mod common;
mod emit;
mod maps;

// One per hook family.
mod cgroup;
mod connect;
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
