//! Typed resources, and loading them from files and directories.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cluster::{
    InstanceSpec, InstanceStatus, NodeSpec, NodeStatus, RouteSpec, ServiceStatus,
};
use crate::decode::{Cx, Decode, Diagnostic};
use crate::meta::ObjectMeta;
use crate::policy::{NetworkPolicySpec, PolicySpec};
use crate::policytest::PolicyTestSpec;
use crate::service::ServiceSpec;
use crate::yaml::{self, Limits, Node, Value};

pub const API_VERSION: &str = "skiff.dev/v1";
pub const K8S_NETWORKING: &str = "networking.k8s.io/v1";

/// A resource: metadata, desired state, and observed state where the kind has one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Object<S, T = ()> {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: S,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<T>,
}

impl<S, T> Object<S, T> {
    /// The namespace, `default` when unset (always set for namespaced kinds after loading).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

/// Every kind Skiff reads.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Resource {
    Service(Box<Object<ServiceSpec, ServiceStatus>>),
    Instance(Object<InstanceSpec, InstanceStatus>),
    Node(Object<NodeSpec, NodeStatus>),
    Policy(Object<PolicySpec>),
    NetworkPolicy(Object<NetworkPolicySpec>),
    Route(Object<RouteSpec>),
    PolicyTest(Object<PolicyTestSpec>),
    Namespace(Object<NamespaceSpec>),
}

/// A namespace's spec: nothing yet; its labels (in `metadata`) are what
/// policies' namespace selectors match.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NamespaceSpec {}

impl Decode for NamespaceSpec {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        cx.fields(node, &[])?;
        Some(NamespaceSpec {})
    }
}

/// What the API needs to know about a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    pub api_version: &'static str,
    /// The path segment: `/apis/{api_version}/namespaces/{ns}/{plural}/{name}`.
    pub plural: &'static str,
    pub namespaced: bool,
    /// Whether the kind has a `status` written through `/status`.
    pub has_status: bool,
}

pub const KINDS: &[KindInfo] = &[
    KindInfo {
        kind: "Service",
        api_version: API_VERSION,
        plural: "services",
        namespaced: true,
        has_status: true,
    },
    KindInfo {
        kind: "Instance",
        api_version: API_VERSION,
        plural: "instances",
        namespaced: true,
        has_status: true,
    },
    KindInfo {
        kind: "Node",
        api_version: API_VERSION,
        plural: "nodes",
        namespaced: false,
        has_status: true,
    },
    KindInfo {
        kind: "Policy",
        api_version: API_VERSION,
        plural: "policies",
        namespaced: true,
        has_status: false,
    },
    KindInfo {
        kind: "NetworkPolicy",
        api_version: K8S_NETWORKING,
        plural: "networkpolicies",
        namespaced: true,
        has_status: false,
    },
    KindInfo {
        kind: "Route",
        api_version: API_VERSION,
        plural: "routes",
        namespaced: true,
        has_status: false,
    },
    KindInfo {
        kind: "PolicyTest",
        api_version: API_VERSION,
        plural: "policytests",
        namespaced: false,
        has_status: false,
    },
    KindInfo {
        kind: "Namespace",
        api_version: API_VERSION,
        plural: "namespaces",
        namespaced: false,
        has_status: false,
    },
];

impl KindInfo {
    /// By kind name (`Service`), plural (`services`), or singular lowercase (`service`).
    pub fn find(name: &str) -> Option<&'static KindInfo> {
        let lower = name.to_ascii_lowercase();
        KINDS
            .iter()
            .find(|k| k.kind == name || k.plural == lower || k.kind.to_ascii_lowercase() == lower)
    }
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Service(_) => "Service",
            Resource::Instance(_) => "Instance",
            Resource::Node(_) => "Node",
            Resource::Policy(_) => "Policy",
            Resource::NetworkPolicy(_) => "NetworkPolicy",
            Resource::Route(_) => "Route",
            Resource::PolicyTest(_) => "PolicyTest",
            Resource::Namespace(_) => "Namespace",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Resource::Service(o) => &o.metadata,
            Resource::Instance(o) => &o.metadata,
            Resource::Node(o) => &o.metadata,
            Resource::Policy(o) => &o.metadata,
            Resource::NetworkPolicy(o) => &o.metadata,
            Resource::Route(o) => &o.metadata,
            Resource::PolicyTest(o) => &o.metadata,
            Resource::Namespace(o) => &o.metadata,
        }
    }

    /// `Kind namespace/name`, or `Kind name` for cluster-scoped kinds.
    pub fn display_name(&self) -> String {
        let meta = self.metadata();
        match &meta.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind(), meta.name),
            None => format!("{} {}", self.kind(), meta.name),
        }
    }

    pub fn info(&self) -> &'static KindInfo {
        KindInfo::find(self.kind()).unwrap_or(&KINDS[0])
    }

    /// Decodes one document, reporting every problem into `cx`.
    pub fn decode(node: &Node, cx: &mut Cx) -> Option<Resource> {
        Self::decode_in(node, cx, "default")
    }

    /// Like [`Resource::decode`], with the namespace namespaced kinds get
    /// when the document names none.
    pub fn decode_in(node: &Node, cx: &mut Cx, default_namespace: &str) -> Option<Resource> {
        let m = cx.fields(node, &["apiVersion", "kind", "metadata", "spec", "status"])?;
        let kind: Option<String> = m.req(cx, "kind");
        let api_version: Option<String> = m.req(cx, "apiVersion");
        let (kind, api_version) = (kind?, api_version?);
        let Some(&KindInfo {
            kind,
            api_version: expected_api,
            namespaced,
            has_status,
            ..
        }) = KINDS.iter().find(|k| k.kind == kind)
        else {
            let known: Vec<&str> = KINDS.iter().map(|k| k.kind).collect();
            m.check(cx, "kind", false, || {
                format!(
                    "unknown kind `{kind}`; expected one of {}",
                    known.join(", ")
                )
            });
            return None;
        };
        m.check(cx, "apiVersion", api_version == expected_api, || {
            format!("kind {kind} has apiVersion {expected_api}, found `{api_version}`")
        });
        let mut metadata: Option<ObjectMeta> = m.req(cx, "metadata");
        if let Some(meta) = &mut metadata {
            if namespaced {
                meta.namespace
                    .get_or_insert_with(|| default_namespace.to_string());
            } else if meta.namespace.is_some() {
                let mark = m
                    .raw("metadata")
                    .and_then(|n| n.get("namespace"))
                    .map_or(m.mark(), |n| n.mark);
                cx.at("metadata", |cx| {
                    cx.at("namespace", |cx| {
                        cx.error(
                            mark,
                            format!("{kind} is not namespaced; remove `namespace`"),
                        )
                    })
                });
            }
        }
        if !has_status && m.has("status") {
            m.check(cx, "status", false, || {
                format!("{kind} has no `status`; remove it")
            });
        }
        fn object<S: Decode, T: Decode>(
            m: &crate::decode::Fields<'_>,
            cx: &mut Cx,
            api_version: String,
            kind: &str,
            metadata: Option<ObjectMeta>,
        ) -> Option<Object<S, T>> {
            let spec = m.req(cx, "spec");
            let status = m.opt(cx, "status");
            Some(Object {
                api_version,
                kind: kind.to_string(),
                metadata: metadata?,
                spec: spec?,
                status,
            })
        }
        Some(match kind {
            "Service" => Resource::Service(Box::new(object(&m, cx, api_version, kind, metadata)?)),
            "Instance" => Resource::Instance(object(&m, cx, api_version, kind, metadata)?),
            "Node" => Resource::Node(object(&m, cx, api_version, kind, metadata)?),
            "Policy" => Resource::Policy(object(&m, cx, api_version, kind, metadata)?),
            "NetworkPolicy" => {
                Resource::NetworkPolicy(object(&m, cx, api_version, kind, metadata)?)
            }
            "Route" => Resource::Route(object(&m, cx, api_version, kind, metadata)?),
            // A namespace needs no spec.
            "Namespace" => Resource::Namespace(Object {
                api_version,
                kind: kind.to_string(),
                metadata: metadata?,
                spec: m.opt(cx, "spec").unwrap_or_default(),
                status: None,
            }),
            _ => Resource::PolicyTest(object(&m, cx, api_version, kind, metadata)?),
        })
    }
}

/// `()` as a status: kinds without one never decode it.
impl Decode for () {
    fn decode(_: &Node, _: &mut Cx) -> Option<Self> {
        Some(())
    }
}

/// A resource and where it was read from.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub resource: Resource,
    pub file: String,
    pub line: usize,
}

/// What loading a set of paths produced: the valid resources and every error.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub resources: Vec<Loaded>,
    pub errors: Vec<Diagnostic>,
}

/// Decodes every document in `src`. A file with any error yields no resources:
/// callers act on whole files, never on half of one.
pub fn load_str(file: &str, src: &str) -> Result<Vec<Loaded>, Vec<Diagnostic>> {
    load_str_in(file, src, "default")
}

/// [`load_str`] with the namespace for documents that name none.
pub fn load_str_in(
    file: &str,
    src: &str,
    default_namespace: &str,
) -> Result<Vec<Loaded>, Vec<Diagnostic>> {
    let docs = yaml::parse(src, Limits::default()).map_err(|e| {
        vec![Diagnostic {
            file: file.to_string(),
            line: e.mark.line,
            col: e.mark.col,
            field: String::new(),
            message: e.message,
        }]
    })?;
    let mut cx = Cx::new(file);
    let mut out = Vec::new();
    // A JSON array of objects is read like a multi-document stream.
    let docs: Vec<Node> = match docs.as_slice() {
        [
            Node {
                value: Value::Seq(items),
                ..
            },
        ] if file.ends_with(".json") => items.clone(),
        _ => docs,
    };
    for doc in &docs {
        if doc.value == Value::Null {
            continue;
        }
        if let Some(resource) = Resource::decode_in(doc, &mut cx, default_namespace) {
            out.push(Loaded {
                resource,
                file: file.to_string(),
                line: doc.mark.line,
            });
        }
    }
    let errors = cx.into_errors();
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Loads files and directories (recursively: `*.yaml`, `*.yml`, `*.json`,
/// skipping hidden entries), in a stable order. Reports resources defined
/// twice across the set.
pub fn load_paths(paths: &[PathBuf]) -> LoadReport {
    let mut report = LoadReport::default();
    let mut files = Vec::new();
    for path in paths {
        if let Err(e) = collect_files(path, true, &mut files) {
            report.errors.push(file_error(path, e));
        }
    }
    for file in files {
        let name = file.display().to_string();
        match read_limited(&file, Limits::default().max_bytes) {
            Ok(src) => match load_str(&name, &src) {
                Ok(resources) => report.resources.extend(resources),
                Err(errors) => report.errors.extend(errors),
            },
            Err(e) => report.errors.push(file_error(&file, e)),
        }
    }
    check_duplicates(&mut report);
    report
}

fn check_duplicates(report: &mut LoadReport) {
    let mut seen: std::collections::HashMap<(String, Option<String>, String), (String, usize)> =
        Default::default();
    for l in &report.resources {
        let meta = l.resource.metadata();
        let key = (
            l.resource.kind().to_string(),
            meta.namespace.clone(),
            meta.name.clone(),
        );
        if let Some((file, line)) = seen.get(&key) {
            report.errors.push(Diagnostic {
                file: l.file.clone(),
                line: l.line,
                col: 1,
                field: "metadata.name".to_string(),
                message: format!(
                    "{} is also defined at {file}:{line}",
                    l.resource.display_name()
                ),
            });
        } else {
            seen.insert(key, (l.file.clone(), l.line));
        }
    }
}

fn file_error(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        file: path.display().to_string(),
        line: 0,
        col: 0,
        field: String::new(),
        message,
    }
}

fn collect_files(path: &Path, explicit: bool, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("cannot list directory: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        entries.sort();
        for entry in entries {
            collect_files(&entry, false, out)?;
        }
    } else if explicit || is_manifest(path) {
        out.push(path.to_path_buf());
    }
    Ok(())
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

/// Reads a file, refusing ones over `max` bytes without reading them whole.
fn read_limited(path: &Path, max: usize) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut buf = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if buf.len() > max {
        return Err(format!(
            "file is larger than the {} MiB limit for manifests; split it into smaller files",
            max / (1024 * 1024)
        ));
    }
    String::from_utf8(buf).map_err(|e| {
        format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}
