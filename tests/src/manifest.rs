//! `deploy/kube-flannel-ebpf.yml`, read strictly: every document must be
//! one of the Kubernetes types the install uses, and every field in it
//! must be one that type has (k8s-openapi drops unknown fields silently,
//! so each object is decoded, encoded again and compared with the text:
//! a field that did not survive is reported with its path). The lab's
//! container mode runs the DaemonSet's pod template from here, so the
//! tests fail if the manifest stops being enough.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Namespace, PodSpec, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// The label that marks what a Flannel user's migration applies: every
/// object but the ConfigMap, which keeps the user's own net-conf.json.
pub const PART_LABEL: &str = "flannel-ebpf/part";

/// One object of the manifest.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Manifest {
    pub objects: Vec<Object>,
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("deploy")
}

/// The DaemonSet manifest's path.
pub fn path() -> PathBuf {
    deploy_dir().join("kube-flannel-ebpf.yml")
}

/// Decodes `v` as `T`, refusing any field `T` does not have.
pub fn strict<T: DeserializeOwned + Serialize>(v: &Value, what: &str) -> Result<T> {
    let typed: T =
        serde_json::from_value(v.clone()).with_context(|| format!("{what}: decoding"))?;
    let back = serde_json::to_value(&typed)?;
    let mut lost = Vec::new();
    lost_fields(v, &back, what.to_string(), &mut lost);
    if !lost.is_empty() {
        bail!("unknown or mistyped fields: {}", lost.join(", "));
    }
    Ok(typed)
}

/// Paths in `orig` that `back` (the re-encoded object) does not hold with
/// the same value. Empty containers and nulls count as absent on both
/// sides; numbers and strings that the type holds as quantities or
/// int-or-strings compare by their text.
fn lost_fields(orig: &Value, back: &Value, path: String, out: &mut Vec<String>) {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => lost_fields(v, w, format!("{path}.{k}"), out),
                    None if empty(v) => {}
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                out.push(format!("{path} (length {} != {})", a.len(), b.len()));
            }
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                lost_fields(v, w, format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (Value::Number(n), Value::String(s)) | (Value::String(s), Value::Number(n))
            if n.to_string() == *s => {}
        (a, b) if empty(a) && empty(b) => {}
        (a, b) => out.push(format!("{path} ({a} became {b})")),
    }
}

/// Parses every document of `text` strictly.
pub fn parse(text: &str) -> Result<Manifest> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).context("the manifest is not YAML")?;
    let mut objects = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or("").to_string();
        let what = format!(
            "document {} ({kind} {})",
            i + 1,
            doc["metadata"]["name"].as_str().unwrap_or("?")
        );
        let api = doc["apiVersion"].as_str().unwrap_or("");
        let want_api = match kind.as_str() {
            "Namespace" | "ServiceAccount" | "ConfigMap" => "v1",
            "ClusterRole" | "ClusterRoleBinding" => "rbac.authorization.k8s.io/v1",
            "DaemonSet" => "apps/v1",
            _ => bail!("{what}: kind {kind:?} is not one the install uses"),
        };
        if api != want_api {
            bail!("{what}: apiVersion {api:?}, want {want_api:?}");
        }
        let obj = match kind.as_str() {
            "Namespace" => Object::Namespace(strict(&doc, &what)?),
            "ServiceAccount" => Object::ServiceAccount(strict(&doc, &what)?),
            "ClusterRole" => Object::ClusterRole(strict(&doc, &what)?),
            "ClusterRoleBinding" => Object::ClusterRoleBinding(strict(&doc, &what)?),
            "ConfigMap" => Object::ConfigMap(strict(&doc, &what)?),
            _ => Object::DaemonSet(Box::new(strict(&doc, &what)?)),
        };
        objects.push(obj);
    }
    Ok(Manifest { objects })
}

/// Reads and parses [`path`].
pub fn load() -> Result<Manifest> {
    let p = path();
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    parse(&text).with_context(|| format!("{}", p.display()))
}

impl Manifest {
    pub fn daemonset(&self) -> Result<&DaemonSet> {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::DaemonSet(d) => Some(&**d),
                _ => None,
            })
            .context("the manifest has no DaemonSet")
    }

    pub fn config_map(&self) -> Result<&ConfigMap> {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::ConfigMap(c) => Some(c),
                _ => None,
            })
            .context("the manifest has no ConfigMap")
    }

    pub fn cluster_role(&self) -> Result<&ClusterRole> {
        self.objects
            .iter()
            .find_map(|o| match o {
                Object::ClusterRole(c) => Some(c),
                _ => None,
            })
            .context("the manifest has no ClusterRole")
    }

    /// The DaemonSet's pod template.
    pub fn pod_spec(&self) -> Result<&PodSpec> {
        self.daemonset()?
            .spec
            .template
            .spec
            .as_ref()
            .context("the DaemonSet has no pod template")
    }

    /// A file of the ConfigMap.
    pub fn config_file(&self, key: &str) -> Result<&str> {
        self.config_map()?
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(String::as_str)
            .with_context(|| format!("the ConfigMap has no {key}"))
    }

    /// The image every container runs.
    pub fn image(&self) -> Result<String> {
        let spec = self.pod_spec()?;
        let mut images: Vec<&str> = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .filter_map(|c| c.image.as_deref())
            .collect();
        images.dedup();
        match images.as_slice() {
            [one] => Ok(one.to_string()),
            _ => bail!("the containers run {images:?}, not one image"),
        }
    }
}

/// Where the image for `tag` is saved by `cargo xtask image`.
pub fn image_archive(tag: &str) -> PathBuf {
    deploy_dir()
        .parent()
        .expect("workspace")
        .join("target/image")
        .join(format!("flannel-ebpf-{tag}.tar"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_mistyped_fields_are_refused() {
        let ok = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg, namespace: kube-flannel}
data: {a: text}
"#;
        assert_eq!(parse(ok).unwrap().objects.len(), 1);
        for (bad, want) in [
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndatta: {a: b}\n",
                "document 1 (ConfigMap x).datta",
            ),
            (
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec:\n  selector: {}\n  template:\n    spec:\n      containers:\n        - name: c\n          securityContext: {readOnlyRootFS: true}\n",
                "spec.template.spec.containers[0].securityContext.readOnlyRootFS",
            ),
            ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n", "kind \"Secret\""),
            ("apiVersion: v2\nkind: ConfigMap\nmetadata: {name: s}\n", "apiVersion \"v2\""),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: [1]\n",
                "decoding",
            ),
        ] {
            let err = format!("{:#}", parse(bad).unwrap_err());
            assert!(err.contains(want), "{want:?} not in {err}");
        }
    }
}
