//! Kernel programs of the proxy: one entry per hook over shared parsing, lookup and NAT code.
#![no_std]
#![no_main]

mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod sock;
mod tc;
mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
