//! Mesh profiles: which mesh a pod runs, and what that mesh's proxy looks
//! like to the kernel, as data. The built-in profiles are
//! `profiles.toml`; an operator's file adds or replaces profiles by name
//! (`--mesh-profiles`), without a rebuild.

mod profile;

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result, bail};

pub use profile::{
    CaptureKeys, Hold, Mark, Mitigation, Mode, PortRange, PortRole, Profile, Recommendations,
    Uncaptured,
};

use crate::{k8s::PodInfo, race::ambient::AmbientProfile};

/// The `mesh` label of a pod with no mesh, and of events outside pods.
pub const NO_MESH: &str = "none";
/// Profiles loaded at most: each is a value of the `mesh` label.
pub const MAX_PROFILES: usize = 16;
/// The built-in profiles' file.
const BUILTIN: &str = include_str!("profiles.toml");
/// The profile whose ports and uid the `--capture-port`, `--sidecar-ports`
/// and `--proxy-uid` flags override (the flags came before profiles).
pub const DEFAULT_PROFILE: &str = "istio";

/// The profiles in effect, in order: a pod's evidence is matched against
/// each, first match wins. Each is kept with its TOML table too, so that
/// an operator's profile can change a few fields of one.
#[derive(Debug, Clone)]
pub struct Profiles {
    list: Vec<Arc<Profile>>,
    tables: Vec<toml::Table>,
}

impl Default for Profiles {
    fn default() -> Self {
        Profiles::builtin()
    }
}

impl Profiles {
    /// The built-in profiles (checked by a unit test, so this cannot fail
    /// in a released binary).
    pub fn builtin() -> Profiles {
        let mut p = Profiles {
            list: Vec::new(),
            tables: Vec::new(),
        };
        p.apply(BUILTIN, "built-in profiles")
            .expect("the built-in profiles parse");
        p
    }

    /// Applies a profiles file's text (`[[profile]]` tables; `what` names
    /// it in errors). A table whose `name` is a known profile changes the
    /// fields it gives of that profile (sub-tables key by key); one with
    /// `extends = "<name>"` starts from that profile under its own name;
    /// any other is a whole new profile.
    fn apply(&mut self, text: &str, what: &str) -> Result<()> {
        let mut file: toml::Table =
            toml::from_str(text).with_context(|| format!("{what}: not a TOML file"))?;
        let tables = match file.remove("profile") {
            Some(toml::Value::Array(a)) => a,
            None => Vec::new(),
            Some(_) => bail!("{what}: `profile` must be an array of tables ([[profile]])"),
        };
        if let Some(k) = file.keys().next() {
            bail!("{what}: unknown key `{k}` (only [[profile]] tables)");
        }
        for (i, t) in tables.into_iter().enumerate() {
            let toml::Value::Table(mut t) = t else {
                bail!("{what}: profile #{}: not a table", i + 1);
            };
            let name = match t.get("name") {
                Some(toml::Value::String(n)) => n.clone(),
                _ => bail!("{what}: profile #{}: needs a `name`", i + 1),
            };
            let base = match t.remove("extends") {
                Some(toml::Value::String(b)) => Some(b),
                Some(_) => bail!("{what}: profile {name:?}: `extends` names a profile"),
                None => None,
            };
            let base_name = base.as_deref().unwrap_or(&name);
            let merged = match self.list.iter().position(|p| p.name == base_name) {
                Some(at) => merge(self.tables[at].clone(), t),
                None if base.is_some() => {
                    bail!(
                        "{what}: profile {name:?} extends {base_name:?}, which is not defined before it"
                    )
                }
                None => t,
            };
            let profile: Profile = merged
                .clone()
                .try_into()
                .with_context(|| format!("{what}: profile {name:?}"))?;
            self.put(profile, merged)
                .with_context(|| what.to_string())?;
        }
        Ok(())
    }

    /// The built-in profiles with an operator's file applied (see
    /// [`Profiles::apply`]).
    pub fn load(file: Option<&Path>) -> Result<Profiles> {
        let mut p = Profiles::builtin();
        if let Some(path) = file {
            let meta = std::fs::metadata(path)
                .with_context(|| format!("mesh profiles file {}", path.display()))?;
            if !meta.is_file() {
                bail!("mesh profiles file {}: not a regular file", path.display());
            }
            if meta.len() > 1 << 20 {
                bail!("mesh profiles file {}: larger than 1 MiB", path.display());
            }
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("mesh profiles file {}", path.display()))?;
            p.apply(&text, &format!("mesh profiles file {}", path.display()))?;
        }
        Ok(p)
    }

    /// Adds `profile` (made from `table`), or replaces the one of its name.
    fn put(&mut self, mut profile: Profile, table: toml::Table) -> Result<()> {
        profile.validate().map_err(anyhow::Error::msg)?;
        profile.label = Arc::from(profile.name.as_str());
        if let Some(at) = self.list.iter().position(|p| p.name == profile.name) {
            self.list[at] = Arc::new(profile);
            self.tables[at] = table;
            return Ok(());
        }
        if self.list.len() >= MAX_PROFILES {
            bail!("more than {MAX_PROFILES} mesh profiles");
        }
        self.list.push(Arc::new(profile));
        self.tables.push(table);
        Ok(())
    }

    /// Applies the older flags (`--capture-port`, `--sidecar-ports`,
    /// `--proxy-uid`) to the default profile, those given only.
    pub fn override_default(
        &mut self,
        outbound_port: Option<u16>,
        proxy_ports: Option<&[u16]>,
        proxy_uid: Option<u32>,
    ) -> Result<()> {
        if outbound_port.is_none() && proxy_ports.is_none() && proxy_uid.is_none() {
            return Ok(());
        }
        let Some(p) = self.list.iter_mut().find(|p| p.name == DEFAULT_PROFILE) else {
            return Ok(());
        };
        let mut q = Profile::clone(p);
        if let Some(ports) = proxy_ports {
            q.proxy_ports = ports.to_vec();
        }
        if let Some(port) = outbound_port {
            q.outbound_port = port;
        }
        if !q.proxy_ports.contains(&q.outbound_port) {
            q.proxy_ports.push(q.outbound_port);
        }
        if let Some(uid) = proxy_uid {
            q.proxy_uids = vec![uid];
        }
        q.validate().map_err(anyhow::Error::msg)?;
        *p = Arc::new(q);
        Ok(())
    }

    /// Every profile, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.list.iter()
    }

    /// The profile of this name.
    pub fn get(&self, name: &str) -> Option<&Arc<Profile>> {
        self.list.iter().find(|p| p.name == name)
    }

    /// The default profile (the first if it was removed... it cannot be:
    /// an operator's file replaces, never removes).
    pub fn default_profile(&self) -> &Arc<Profile> {
        self.get(DEFAULT_PROFILE).unwrap_or(&self.list[0])
    }

    /// The sidecar profile whose proxy runs in container `name`.
    pub fn by_container(&self, name: &str) -> Option<&Arc<Profile>> {
        self.sidecars().find(|p| p.proxy_container(name))
    }

    /// The sidecar profile whose proxy is uid `uid` and listens on `port`:
    /// a LISTEN that marks a pod.
    pub fn by_listen(&self, uid: u32, port: u16) -> Option<&Arc<Profile>> {
        self.sidecars()
            .find(|p| p.proxy_uid(uid) && p.proxy_ports.contains(&port))
    }

    /// The sidecar profile whose proxy is uid `uid`.
    pub fn by_uid(&self, uid: u32) -> Option<&Arc<Profile>> {
        self.sidecars().find(|p| p.proxy_uid(uid))
    }

    /// Whether `uid` is some sidecar profile's proxy uid.
    pub fn any_proxy_uid(&self, uid: u32) -> bool {
        self.sidecars().any(|p| p.proxy_uid(uid))
    }

    /// The sidecar profile whose marks the API's pod carries.
    pub fn of_pod(&self, p: &PodInfo) -> Option<&Arc<Profile>> {
        self.sidecars().find(|m| m.marks(p))
    }

    /// Outbound capture ports of every sidecar profile, deduplicated (the
    /// kernel reports capture resets from these).
    pub fn outbound_ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.sidecars().map(|p| p.outbound_port).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The node-proxy mode's facts (Istio ambient): the first profile's
    /// that has them. The built-in `istio` profile has them, and an
    /// operator's file changes profiles, never removes them.
    pub fn ambient(&self) -> &AmbientProfile {
        static BUILTIN_AMBIENT: std::sync::LazyLock<AmbientProfile> =
            std::sync::LazyLock::new(|| {
                Profiles::builtin()
                    .list
                    .iter()
                    .find_map(|p| p.ambient.clone())
                    .expect("the built-in profiles have ambient mode's")
            });
        self.list
            .iter()
            .find_map(|p| p.ambient.as_ref())
            .unwrap_or(&BUILTIN_AMBIENT)
    }

    fn sidecars(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.list.iter().filter(|p| p.mode == Mode::Sidecar)
    }
}

/// The profiles the agent runs with, for the parts of the agent that only
/// ask "is this a proxy's container?" (the revision reader), set once at
/// start; the built-in profiles until then.
static INSTALLED: std::sync::OnceLock<Arc<Profiles>> = std::sync::OnceLock::new();

/// Makes `p` the profiles [`proxy_container`] answers from (the first call
/// wins: one set of profiles per process).
pub fn install(p: Arc<Profiles>) {
    let _ = INSTALLED.set(p);
}

/// The installed profiles (the built-in ones if none were installed).
pub fn installed() -> &'static Arc<Profiles> {
    INSTALLED.get_or_init(|| Arc::new(Profiles::builtin()))
}

/// Whether `name` is a mesh proxy's container, by the installed profiles.
pub fn proxy_container(name: &str) -> bool {
    installed().by_container(name).is_some()
}

/// What the proxy of mesh `mesh` is called in texts: its first container's
/// name (`istio-proxy`), by the installed profiles.
pub fn proxy_name(mesh: &str) -> String {
    installed()
        .get(mesh)
        .and_then(|m| m.proxy_containers.first().cloned())
        .unwrap_or_else(|| "the proxy".into())
}

/// `over`'s keys on `base`: a sub-table key by key (an operator changes one
/// recommendation without restating the others), anything else whole.
fn merge(mut base: toml::Table, over: toml::Table) -> toml::Table {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => {
                let merged = merge(std::mem::take(b), o);
                *b = merged;
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    base
}

/// Whether `key` is set to true in a proxy config given as JSON or YAML.
pub fn config_flag(text: &str, key: &str) -> bool {
    let Some(i) = text.find(key) else {
        return false;
    };
    let rest = text[i + key.len()..].trim_start_matches(['"', '\'', ' ']);
    let Some(rest) = rest.strip_prefix(':') else {
        return false;
    };
    rest.trim_start_matches([' ', '"', '\'', '\t'])
        .starts_with("true")
}

#[cfg(test)]
mod tests;
