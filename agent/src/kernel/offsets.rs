//! Field offsets for the kernel programs, read from this kernel at start-up.
//!
//! Rust eBPF has no CO-RE, so nothing is compiled in for one kernel:
//! tracepoint record layouts come from tracefs `format` files and struct
//! member offsets from `/sys/kernel/btf/vmlinux` (parsed by `btf-rs`). A
//! missing offset is [`OFFSET_UNKNOWN`]; the kernel programs then skip what
//! needs it, and `connscope check` says what degrades.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use connscope_ebpf::{Config, OFFSET_UNKNOWN};

/// One field of a tracepoint record, as its `format` file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// Parses a tracefs `format` file into field name -> layout.
///
/// Lines look like `\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;`;
/// array and `__data_loc` fields keep their bare name (`saddr`, `filename`).
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in line.split(';') {
            let part = part.trim();
            if let Some(d) = part.strip_prefix("field:") {
                decl = Some(d);
            } else if let Some(o) = part.strip_prefix("offset:") {
                offset = o.trim().parse().ok();
            } else if let Some(s) = part.strip_prefix("size:") {
                size = s.trim().parse().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        let Some(last) = decl.split_whitespace().last() else {
            continue;
        };
        let name = last
            .split('[')
            .next()
            .unwrap_or(last)
            .trim_start_matches('*');
        if !name.is_empty() {
            fields.insert(name.to_string(), Field { offset, size });
        }
    }
    fields
}

/// The tracefs root, mounted if it is absent (DEVELOPERS.md: some nodes
/// have it only under debugfs, or not at all until mounted).
pub(crate) fn tracefs_root() -> Result<&'static Path> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Ok(Path::new(p));
        }
    }
    let mounted = nix::mount::mount(
        Some("tracefs"),
        "/sys/kernel/tracing",
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    if mounted.is_ok() && Path::new("/sys/kernel/tracing/events").is_dir() {
        return Ok(Path::new("/sys/kernel/tracing"));
    }
    let why = match mounted {
        Err(errno) => std::io::Error::from(errno),
        // Mounted, but no events/: the errno of that failed stat, as before.
        Ok(()) => std::io::Error::last_os_error(),
    };
    bail!("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {why}")
}

/// Reads one tracepoint's format, or `None` if this kernel lacks it.
pub(crate) fn tracepoint_format(
    root: &Path,
    category: &str,
    name: &str,
) -> Option<HashMap<String, Field>> {
    let text =
        std::fs::read_to_string(root.join("events").join(category).join(name).join("format"))
            .ok()?;
    Some(parse_format(&text))
}

fn off(fields: Option<&HashMap<String, Field>>, name: &str) -> u32 {
    fields
        .and_then(|f| f.get(name))
        .map_or(OFFSET_UNKNOWN, |f| f.offset)
}

/// Byte offset of a member path (`["__sk_common", "skc_net"]`) in a named
/// struct, descending through anonymous structs and unions.
pub(crate) fn btf_member_offset(btf: &Btf, strukt: &str, path: &[&str]) -> Result<u32> {
    let ty = btf
        .resolve_types_by_name(strukt)
        .with_context(|| format!("struct {strukt} not in BTF"))?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(_)))
        .ok_or_else(|| anyhow!("{strukt} is not a struct in BTF"))?;
    let mut bits = 0u32;
    let mut cur = ty;
    for want in path {
        let (b, next) = find_member(btf, &cur, want, 0)?
            .ok_or_else(|| anyhow!("{strukt} has no member {want}"))?;
        bits += b;
        cur = next;
    }
    if !bits.is_multiple_of(8) {
        bail!("{strukt}.{} is a bitfield", path.join("."));
    }
    Ok(bits / 8)
}

/// Searches `ty` (a struct or union) for `name`, returning its bit offset and
/// its (typedef-resolved) type. Anonymous members are searched recursively.
fn find_member(btf: &Btf, ty: &Type, name: &str, depth: u32) -> Result<Option<(u32, Type)>> {
    if depth > 8 {
        return Ok(None);
    }
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return Ok(None),
    };
    for m in members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let mty = resolve_typedefs(btf, btf.resolve_chained_type(m)?)?;
        if mname == name {
            if m.bitfield_size().is_some_and(|b| b != 0) {
                bail!("{name} is a bitfield");
            }
            return Ok(Some((m.bit_offset(), mty)));
        }
        if mname.is_empty()
            && let Some((b, t)) = find_member(btf, &mty, name, depth + 1)?
        {
            return Ok(Some((m.bit_offset() + b, t)));
        }
    }
    Ok(None)
}

fn resolve_typedefs(btf: &Btf, mut ty: Type) -> Result<Type> {
    for _ in 0..16 {
        match &ty {
            Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) => {
                ty = btf.resolve_chained_type(ty.as_btf_type().expect("typed"))?;
            }
            _ => return Ok(ty),
        }
    }
    Ok(ty)
}

/// What could and could not be found, for `connscope check` and the logs.
#[derive(Debug, Default, Clone)]
pub(crate) struct Discovery {
    /// Tracepoints (`category/name`) whose format file is missing.
    pub missing_tracepoints: Vec<String>,
    /// BTF-derived offsets that could not be found, with the reason.
    pub missing_btf: Vec<String>,
    /// `tcp:tcp_send_reset` fires for SYNs that found no socket: its format
    /// has the `reason` field (the same kernel change, 6.10), so a refused
    /// captured connect shows as a reset from the capture port. Without it
    /// the hook attaches but proves nothing.
    pub no_socket_resets: bool,
}

/// Builds the kernel programs' [`Config`] for this kernel.
pub(crate) fn discover(tracefs: &Path, btf_path: &Path) -> (Config, Discovery) {
    let mut d = Discovery::default();
    let mut fmt = |cat: &str, name: &str| {
        let f = tracepoint_format(tracefs, cat, name);
        if f.is_none() {
            d.missing_tracepoints.push(format!("{cat}/{name}"));
        }
        f
    };
    let sss = fmt("sock", "inet_sock_set_state");
    let rst = fmt("tcp", "tcp_receive_reset");
    let tsr = fmt("tcp", "tcp_send_reset");
    d.no_socket_resets = tsr.as_ref().is_some_and(|f| f.contains_key("reason"));
    let enter = fmt("syscalls", "sys_enter_connect");
    let exit = fmt("syscalls", "sys_exit_connect");
    let exec = fmt("sched", "sched_process_exec");
    let pexit = fmt("sched", "sched_process_exit");
    let mkdir = fmt("cgroup", "cgroup_mkdir");
    let rmdir = fmt("cgroup", "cgroup_rmdir");
    let mut cfg = Config {
        sss_skaddr: off(sss.as_ref(), "skaddr"),
        sss_oldstate: off(sss.as_ref(), "oldstate"),
        sss_newstate: off(sss.as_ref(), "newstate"),
        sss_sport: off(sss.as_ref(), "sport"),
        sss_dport: off(sss.as_ref(), "dport"),
        sss_family: off(sss.as_ref(), "family"),
        sss_protocol: off(sss.as_ref(), "protocol"),
        sss_saddr: off(sss.as_ref(), "saddr"),
        sss_daddr: off(sss.as_ref(), "daddr"),
        sss_saddr_v6: off(sss.as_ref(), "saddr_v6"),
        sss_daddr_v6: off(sss.as_ref(), "daddr_v6"),
        rst_skaddr: off(rst.as_ref(), "skaddr"),
        tsr_skbaddr: off(tsr.as_ref(), "skbaddr"),
        tsr_skaddr: off(tsr.as_ref(), "skaddr"),
        tsr_saddr: off(tsr.as_ref(), "saddr"),
        tsr_daddr: off(tsr.as_ref(), "daddr"),
        enter_fd: off(enter.as_ref(), "fd"),
        enter_uservaddr: off(enter.as_ref(), "uservaddr"),
        enter_addrlen: off(enter.as_ref(), "addrlen"),
        exit_ret: off(exit.as_ref(), "ret"),
        exec_filename: off(exec.as_ref(), "filename"),
        exit_group_dead: off(pexit.as_ref(), "group_dead"),
        mkdir_root: off(mkdir.as_ref(), "root"),
        mkdir_level: off(mkdir.as_ref(), "level"),
        mkdir_id: off(mkdir.as_ref(), "id"),
        mkdir_path: off(mkdir.as_ref(), "path"),
        rmdir_root: off(rmdir.as_ref(), "root"),
        rmdir_level: off(rmdir.as_ref(), "level"),
        rmdir_id: off(rmdir.as_ref(), "id"),
        rmdir_path: off(rmdir.as_ref(), "path"),
        ..Config::UNKNOWN
    };
    match Btf::from_file(btf_path) {
        Ok(btf) => {
            let mut get = |s: &str, path: &[&str]| match btf_member_offset(&btf, s, path) {
                Ok(o) => o,
                Err(e) => {
                    d.missing_btf.push(format!("{s}.{}: {e:#}", path.join(".")));
                    OFFSET_UNKNOWN
                }
            };
            cfg.sock_sk_err = get("sock", &["sk_err"]);
            cfg.task_nsproxy = get("task_struct", &["nsproxy"]);
            cfg.nsproxy_net_ns = get("nsproxy", &["net_ns"]);
            cfg.net_inum = get("net", &["ns", "inum"]);
            cfg.sock_net = get("sock", &["__sk_common", "skc_net", "net"]);
            cfg.sk_protocol = get("sock", &["sk_protocol"]);
            let common = |m: &'static str| ["__sk_common", m];
            cfg.skc_family = get("sock", &common("skc_family"));
            cfg.inet_sport = get("inet_sock", &["inet_sport"]);
            cfg.skc_dport = get("sock", &common("skc_dport"));
            cfg.skc_rcv_saddr = get("sock", &common("skc_rcv_saddr"));
            cfg.skc_daddr = get("sock", &common("skc_daddr"));
            cfg.skc_v6_rcv_saddr = get("sock", &common("skc_v6_rcv_saddr"));
            cfg.skc_v6_daddr = get("sock", &common("skc_v6_daddr"));
            cfg.skc_state = get("sock", &common("skc_state"));
            cfg.skb_dev = get("sk_buff", &["dev"]);
            cfg.dev_nd_net = get("net_device", &["nd_net", "net"]);
        }
        Err(e) => d.missing_btf.push(format!("{}: {e:#}", btf_path.display())),
    }
    (cfg, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSS: &str = "name: inet_sock_set_state
ID: 1420
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;

print fmt: \"family=%s\"
";

    #[test]
    fn parses_scalar_pointer_array_and_data_loc_fields() {
        let f = parse_format(SSS);
        assert_eq!(f["skaddr"], Field { offset: 8, size: 8 });
        assert_eq!(
            f["oldstate"],
            Field {
                offset: 16,
                size: 4
            }
        );
        assert_eq!(
            f["sport"],
            Field {
                offset: 24,
                size: 2
            }
        );
        assert_eq!(
            f["saddr_v6"],
            Field {
                offset: 40,
                size: 16
            }
        );
        assert_eq!(f["filename"].offset, 8);
        assert!(!f.contains_key("print"));
    }

    #[test]
    fn garbage_parses_to_nothing() {
        assert!(parse_format("field:;offset:x;size:;\n\0\u{fffd};;;").is_empty());
        assert!(parse_format("").is_empty());
    }

    #[test]
    fn missing_tracefs_gives_unknown_offsets() {
        let dir = std::env::temp_dir().join(format!("connscope-nofmt-{}", std::process::id()));
        let (cfg, d) = discover(&dir, &dir.join("vmlinux"));
        assert_eq!(cfg, Config::UNKNOWN);
        assert_eq!(d.missing_tracepoints.len(), 9);
        assert!(!d.no_socket_resets);
        assert_eq!(d.missing_btf.len(), 1);
    }

    /// Against this machine's real BTF, where there is one.
    #[test]
    fn real_btf_offsets_are_plausible() {
        let p = Path::new("/sys/kernel/btf/vmlinux");
        let Ok(btf) = Btf::from_file(p) else {
            eprintln!("skipped: no readable {}", p.display());
            return;
        };
        let sk_err = btf_member_offset(&btf, "sock", &["sk_err"]).unwrap();
        let sock_size = btf
            .resolve_types_by_name("sock")
            .unwrap()
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s.size()),
                _ => None,
            })
            .unwrap();
        assert!(sk_err > 0 && (sk_err as usize) < sock_size);
        // skc_family sits inside the anonymous-member-rich struct sock_common.
        assert!(btf_member_offset(&btf, "sock", &["__sk_common", "skc_family"]).is_ok());
        assert!(btf_member_offset(&btf, "sock", &["no_such_member"]).is_err());
        // What the raw socket-state hook needs: inet_sock embeds sock first.
        let sport = btf_member_offset(&btf, "inet_sock", &["inet_sport"]).unwrap();
        assert!(
            sport as usize >= sock_size,
            "inet_sport {sport} after struct sock"
        );
        let dport = btf_member_offset(&btf, "sock", &["__sk_common", "skc_dport"]).unwrap();
        let daddr = btf_member_offset(&btf, "sock", &["__sk_common", "skc_daddr"]).unwrap();
        assert!(
            daddr < dport && dport < 32,
            "sock_common layout: {daddr} {dport}"
        );
        assert!(btf_member_offset(&btf, "sock", &["sk_protocol"]).is_ok());
        // The raw reset hook reads the one-byte state right after the family.
        let family = btf_member_offset(&btf, "sock", &["__sk_common", "skc_family"]).unwrap();
        let state = btf_member_offset(&btf, "sock", &["__sk_common", "skc_state"]).unwrap();
        assert_eq!(state, family + 2, "sock_common layout");
        // A listener's own netns: sk->__sk_common.skc_net.net, inside struct
        // sock_common (before skc_family's neighbours end), a pointer.
        let net = btf_member_offset(&btf, "sock", &["__sk_common", "skc_net", "net"]).unwrap();
        assert!(net < 136 && net.is_multiple_of(8), "skc_net at {net}");
        // The capture-reset hook's netns: skb->dev->nd_net.net.
        assert!(btf_member_offset(&btf, "sk_buff", &["dev"]).is_ok());
        assert!(btf_member_offset(&btf, "net_device", &["nd_net", "net"]).is_ok());
    }
}
