//! Parsing the runtimes' files, and the reader under slow and hostile ones.

use super::*;
use proptest::prelude::*;
use std::time::Instant;

const CONTAINERD: &str = r#"{"ociVersion":"1.1.0","process":{"args":["/app"]},
  "annotations":{"io.kubernetes.cri.container-type":"container",
    "io.kubernetes.cri.container-name":"app",
    "io.kubernetes.cri.sandbox-name":"checkout-7d9f8c6b5-xk2lp",
    "io.kubernetes.cri.sandbox-namespace":"shop",
    "io.kubernetes.cri.sandbox-uid":"0a1b2c3d-4e5f-6789-abcd-ef0123456789",
    "io.kubernetes.cri.sandbox-id":"aaaa"}}"#;
const CRIO: &str = r#"{"ociVersion":"1.0.2","annotations":{
    "io.kubernetes.container.name":"istio-proxy",
    "io.kubernetes.pod.name":"web-0","io.kubernetes.pod.namespace":"prod",
    "io.kubernetes.pod.uid":"11111111-2222-3333-4444-555555555555",
    "io.kubernetes.cri-o.ContainerType":"container"}}"#;

#[test]
fn containerd_annotations() {
    let m = parse_config(CONTAINERD.as_bytes()).unwrap();
    assert_eq!(m.container_name.as_deref(), Some("app"));
    assert_eq!(m.pod_name.as_deref(), Some("checkout-7d9f8c6b5-xk2lp"));
    assert_eq!(m.pod_namespace.as_deref(), Some("shop"));
    assert!(!m.sandbox);
}

#[test]
fn crio_annotations_and_sandbox() {
    let m = parse_config(CRIO.as_bytes()).unwrap();
    assert_eq!(m.container_name.as_deref(), Some("istio-proxy"));
    assert_eq!(
        m.pod_uid.as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    let s = parse_config(br#"{"annotations":{"io.kubernetes.cri.container-type":"sandbox","io.kubernetes.cri.container-name":"POD"}}"#).unwrap();
    assert!(s.sandbox && s.container_name.is_none());
}

#[test]
fn images_in_either_runtime_vocabulary_and_never_the_sandbox_s() {
    let ctd = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": "registry.example/shop/checkout:1.4.2",
    }});
    let m = parse_config(ctd.to_string().as_bytes()).unwrap();
    assert_eq!(
        m.image.as_deref(),
        Some("registry.example/shop/checkout:1.4.2")
    );
    let crio = serde_json::json!({"annotations": {
        "io.kubernetes.cri-o.ContainerType": "container",
        "io.kubernetes.container.name": "istio-proxy",
        "io.kubernetes.cri-o.ImageName": "docker.io/istio/proxyv2:1.22.3",
    }});
    let m = parse_config(crio.to_string().as_bytes()).unwrap();
    assert_eq!(m.image.as_deref(), Some("docker.io/istio/proxyv2:1.22.3"));
    let pause = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.image-name": "registry.k8s.io/pause:3.9",
    }});
    assert_eq!(
        parse_config(pause.to_string().as_bytes()).unwrap().image,
        None
    );
    // Longer than any registry takes: left out and named, the rest kept.
    let long = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-name": "app",
        "io.kubernetes.cri.image-name": format!("r.example/{}:1", "a".repeat(MAX_IMAGE_BYTES)),
    }});
    let m = parse_config(long.to_string().as_bytes()).unwrap();
    assert_eq!((m.image, m.container_name.as_deref()), (None, Some("app")));
    assert_eq!(m.too_long, ["image"]);
    let forged = serde_json::json!({"annotations": {
        "io.kubernetes.cri-o.ImageName": "app:1\n# forged line",
    }});
    let m = parse_config(forged.to_string().as_bytes()).unwrap();
    assert_eq!((m.image, m.too_long), (None, vec!["image"]));
}

#[test]
fn bad_json_is_an_error_and_missing_annotations_are_empty() {
    assert!(matches!(
        parse_config(b"{not json"),
        Err(MetaError::Json(_))
    ));
    assert!(matches!(parse_config(b"[1,2]"), Err(MetaError::Json(_))));
    assert_eq!(parse_config(b"{}").unwrap(), ContainerMeta::default());
}

/// Looks up and waits (bounded) for the reader thread's answer.
fn lookup_wait(r: &mut Reader, id: &str, rt: Runtime) -> Option<ContainerMeta> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        r.poll();
        match r.lookup(id, rt) {
            Lookup::Known(m) => return m,
            Lookup::Pending => assert!(r.wait(deadline), "no answer for {id}"),
        }
    }
}

fn errors(r: &mut Reader) -> Vec<String> {
    r.take_problems()
        .into_iter()
        .filter_map(|p| match p {
            Problem::Error(source, msg) => Some(format!("{source}: {msg}")),
            Problem::TooLong(..) => None,
        })
        .collect()
}

/// Scratch roots in the temp dir, removed on drop.
struct Scratch(PathBuf, Roots);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let root = std::env::temp_dir().join(format!("connscope-rt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let roots = Roots {
            containerd: root.join("ctd"),
            crio: root.join("crio"),
        };
        Scratch(root, roots)
    }

    /// containerd's config.json path of `id`, its directory created.
    fn containerd(&self, id: &str) -> PathBuf {
        let d = self.1.containerd.join("k8s.io").join(id);
        std::fs::create_dir_all(&d).unwrap();
        d.join("config.json")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn reader_finds_files_caches_and_reports_errors() {
    let s = Scratch::new("files");
    let roots = s.1.clone();
    let (a, b, bad) = ("aa11", "bb22", "cc33");
    std::fs::write(s.containerd(a), CONTAINERD).unwrap();
    std::fs::create_dir_all(roots.crio.join(b).join("userdata")).unwrap();
    std::fs::write(roots.crio.join(b).join("userdata/config.json"), CRIO).unwrap();
    std::fs::create_dir_all(roots.crio.join(bad).join("userdata")).unwrap();
    std::fs::write(roots.crio.join(bad).join("userdata/config.json"), "{").unwrap();
    let mut r = Reader::new(roots);
    assert_eq!(
        lookup_wait(&mut r, a, Runtime::Unknown)
            .unwrap()
            .container_name
            .as_deref(),
        Some("app")
    );
    assert_eq!(
        lookup_wait(&mut r, b, Runtime::Crio)
            .unwrap()
            .pod_name
            .as_deref(),
        Some("web-0")
    );
    assert_eq!(
        r.lookup(b, Runtime::Containerd),
        Lookup::Known(Some(parse_config(CRIO.as_bytes()).unwrap())),
        "cached: answered at once"
    );
    assert_eq!(lookup_wait(&mut r, bad, Runtime::Unknown), None);
    let e = errors(&mut r);
    assert!(
        e.len() == 1 && e[0].starts_with("crio: container cc33: malformed"),
        "{e:?}"
    );
    assert_eq!(lookup_wait(&mut r, "dd44", Runtime::Unknown), None);
    assert_eq!(
        r.lookup("../../etc", Runtime::Unknown),
        Lookup::Known(None),
        "ids are hex, never paths"
    );
}

#[test]
fn fifos_devices_and_symlinks_are_refused_at_once() {
    let s = Scratch::new("special");
    let fifo = s.containerd("f1f0");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    std::os::unix::fs::symlink("/dev/zero", s.containerd("2e70")).unwrap();
    std::os::unix::fs::symlink("/dev/null", s.containerd("0011")).unwrap();
    std::fs::create_dir(s.containerd("d1d1")).unwrap();
    let mut r = Reader::new(s.1.clone());
    let t0 = Instant::now();
    for (id, says) in [
        ("f1f0", "is a FIFO, not a regular file"),
        ("2e70", "is a symbolic link, not a regular file"),
        ("0011", "is a symbolic link, not a regular file"),
        ("d1d1", "is a directory, not a regular file"),
    ] {
        assert_eq!(lookup_wait(&mut r, id, Runtime::Containerd), None, "{id}");
        let e = errors(&mut r);
        assert!(
            e.len() == 1 && e[0].starts_with("containerd: container") && e[0].contains(says),
            "{id}: {e:?}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(
        read_bounded(Path::new("/dev/null"))
            .unwrap_err()
            .to_string(),
        "refused: /dev/null is a character device, not a regular file"
    );
}

static READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn counting_read(p: &Path) -> Result<Option<Vec<u8>>, MetaError> {
    READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    read_bounded(p)
}

#[test]
fn failures_are_cached_and_retried_after_a_delay_or_a_new_cgroup() {
    let s = Scratch::new("negative");
    std::fs::write(s.containerd("ba0d"), "{broken").unwrap();
    let mut r = Reader::with_read(s.1.clone(), counting_read);
    let reads = || READS.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(lookup_wait(&mut r, "ba0d", Runtime::Containerd), None);
    assert_eq!(errors(&mut r).len(), 1);
    let after_first = reads();
    for _ in 0..1000 {
        assert_eq!(r.lookup("ba0d", Runtime::Containerd), Lookup::Known(None));
    }
    assert_eq!(
        reads(),
        after_first,
        "a failure is not read again per event"
    );
    assert!(errors(&mut r).is_empty(), "nor counted again");
    // The container's cgroup is created (again): tried at once.
    std::fs::write(s.containerd("ba0d"), CONTAINERD).unwrap();
    r.retry("ba0d");
    assert!(lookup_wait(&mut r, "ba0d", Runtime::Containerd).is_some());
    // After the delay, too.
    std::fs::write(s.containerd("ba0e"), "{broken").unwrap();
    r.error_ttl = Duration::from_millis(50);
    assert_eq!(lookup_wait(&mut r, "ba0e", Runtime::Containerd), None);
    std::fs::write(s.containerd("ba0e"), CONTAINERD).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    assert!(lookup_wait(&mut r, "ba0e", Runtime::Containerd).is_some());
}

fn hung_read(p: &Path) -> Result<Option<Vec<u8>>, MetaError> {
    if p.to_string_lossy().contains("5104") {
        std::thread::sleep(Duration::from_secs(3));
    }
    read_bounded(p)
}

#[test]
fn a_read_that_hangs_is_given_up_and_does_not_hold_up_the_others() {
    let s = Scratch::new("hung");
    std::fs::write(s.containerd("5104"), CONTAINERD).unwrap();
    std::fs::write(s.containerd("600d"), CONTAINERD).unwrap();
    let mut r = Reader::with_read(s.1.clone(), hung_read);
    r.timeout = Duration::from_millis(100);
    assert_eq!(r.lookup("5104", Runtime::Containerd), Lookup::Pending);
    assert_eq!(r.lookup("600d", Runtime::Containerd), Lookup::Pending);
    std::thread::sleep(Duration::from_millis(150));
    r.expire(false);
    let e = errors(&mut r);
    assert!(
        e.iter()
            .any(|e| e.contains("5104") && e.contains("given up")),
        "{e:?}"
    );
    assert_eq!(r.lookup("5104", Runtime::Containerd), Lookup::Known(None));
    // The other read, queued behind the hung one, is answered by the
    // reader that replaced it, well before the hung read returns.
    let t0 = Instant::now();
    assert!(lookup_wait(&mut r, "600d", Runtime::Containerd).is_some());
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn names_longer_than_kubernetes_allows_are_left_out_and_named() {
    let long = "n".repeat(MAX_NAME_BYTES + 1);
    let ok = "o".repeat(MAX_NAME_BYTES);
    let json = serde_json::json!({"annotations": {
        "io.kubernetes.cri.container-name": ok,
        "io.kubernetes.cri.sandbox-name": long,
        "io.kubernetes.cri.sandbox-namespace": "x".repeat(3_000_000),
    }});
    let m = parse_config(json.to_string().as_bytes()).unwrap();
    assert_eq!(m.container_name.as_deref(), Some(ok.as_str()));
    assert_eq!((m.pod_name, m.pod_namespace), (None, None));
    assert_eq!(m.too_long, ["pod", "namespace"]);
}

proptest! {
    #[test]
    fn parse_config_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_config(&bytes);
    }

    #[test]
    fn parse_config_any_annotation_values(k in "[a-z\\.\\-/]{0,40}", v in ".{0,60}") {
        let json = serde_json::json!({"annotations": {k: v}}).to_string();
        prop_assert!(parse_config(json.as_bytes()).is_ok());
    }
}
