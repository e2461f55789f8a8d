//! Perfect's features as manifest operations: the slug each maps to, the inputs and
//! parameters it takes, and the document's limits, checked before any request.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::model::JobSpec;
use crate::providers::util::{self, ImageFormat, Params};

/// "< 10MB" for every image feature (perfect.txt, "Supported Formats & Dimensions").
/// Decimal megabytes, and strictly below.
pub const MAX_INPUT_BYTES: u64 = 10_000_000 - 1;
/// Long side for the hair features, makeup transfer and the image generator.
pub const FACE_MAX_SIDE: u32 = 1024;
/// Long side for enhance, object removal, colorize, background removal and the rest.
pub const EDIT_MAX_SIDE: u32 = 4096;

/// What a feature's run request carries besides its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `style_group_id` + `style_ids: [one]` (the hair features).
    Styled,
    /// No parameters: `"actions":[{"id":0}]`.
    Plain,
    /// `scale`: 1, 2 or 4.
    Enhance,
    /// No files; `prompt`, `style_group_id`, `style_ids`.
    TextToImage,
}

/// One input of a feature: the manifest's position, the `file_sets` key it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// As named in messages and in the manifest's input order (`source|reference`).
    pub name: &'static str,
    /// The `file_sets` field (`src_ids`, `ref_ids`, `mask_ids`).
    pub field: &'static str,
    /// The prepared-ref key the file id is recorded under.
    pub ref_key: &'static str,
}

const SOURCE: Role = Role {
    name: "source",
    field: "src_ids",
    ref_key: "file:src",
};
const IMAGE: Role = Role {
    name: "image",
    field: "src_ids",
    ref_key: "file:src",
};
const REFERENCE: Role = Role {
    name: "reference",
    field: "ref_ids",
    ref_key: "file:ref",
};
const MASK: Role = Role {
    name: "mask",
    field: "mask_ids",
    ref_key: "file:mask",
};

/// A feature of the S2S API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// The manifest's operation name.
    pub operation: &'static str,
    /// The document's section title.
    pub title: &'static str,
    /// The built-in path segment (`/file/<slug>`, `/task/<slug>`).
    pub slug: &'static str,
    /// Whether the slug is confirmed by more than one source (see docs/providers).
    pub verified: bool,
    pub kind: Kind,
    pub inputs: &'static [Role],
    pub max_side: u32,
    pub formats: &'static [ImageFormat],
    /// `output_ext` values the document allows; the first is the default.
    pub output_exts: &'static [&'static str],
}

const JPG: &[ImageFormat] = &[ImageFormat::Jpeg];
const JPG_PNG: &[ImageFormat] = &[ImageFormat::Jpeg, ImageFormat::Png];

pub const FEATURES: &[Feature] = &[
    Feature {
        operation: "hair-style",
        title: "AI Hairstyle Generator",
        slug: "hair-style",
        verified: true,
        kind: Kind::Styled,
        inputs: &[SOURCE],
        max_side: FACE_MAX_SIDE,
        formats: JPG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "wig",
        title: "AI Wig Generator",
        slug: "wig",
        verified: false,
        kind: Kind::Styled,
        inputs: &[SOURCE],
        max_side: FACE_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "hair-extension",
        title: "AI Hair Extension",
        slug: "hair-ext",
        verified: false,
        kind: Kind::Styled,
        inputs: &[SOURCE],
        max_side: FACE_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "hair-bang",
        title: "AI Hair Bang Generator",
        slug: "hair-bang",
        verified: false,
        kind: Kind::Styled,
        inputs: &[SOURCE],
        max_side: FACE_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "hair-volume",
        title: "AI Hair Volume Generator",
        slug: "hair-vol",
        verified: false,
        kind: Kind::Styled,
        inputs: &[SOURCE],
        max_side: FACE_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "aging",
        title: "AI Aging Generator",
        slug: "aging",
        verified: false,
        kind: Kind::Plain,
        inputs: &[SOURCE],
        max_side: EDIT_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "makeup-transfer",
        title: "AI Makeup Transfer",
        slug: "mu-trans-rec",
        verified: true,
        kind: Kind::Plain,
        inputs: &[SOURCE, REFERENCE],
        max_side: FACE_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg"],
    },
    Feature {
        operation: "object-removal",
        title: "AI Object Removal",
        slug: "obj-removal",
        verified: false,
        kind: Kind::Plain,
        inputs: &[IMAGE, MASK],
        max_side: EDIT_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg", "webp"],
    },
    Feature {
        operation: "colorize",
        title: "AI Photo Colorize",
        slug: "colorize",
        verified: true,
        kind: Kind::Plain,
        inputs: &[SOURCE],
        max_side: EDIT_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg", "webp"],
    },
    Feature {
        operation: "background-removal",
        title: "AI Photo Background Removal",
        slug: "sod",
        verified: true,
        kind: Kind::Plain,
        inputs: &[SOURCE],
        max_side: EDIT_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["png", "webp"],
    },
    Feature {
        operation: "photo-enhance",
        title: "AI Photo Enhance",
        slug: "enhance",
        verified: true,
        kind: Kind::Enhance,
        inputs: &[SOURCE],
        max_side: EDIT_MAX_SIDE,
        formats: JPG_PNG,
        output_exts: &["jpg", "webp"],
    },
    Feature {
        operation: "text-to-image",
        title: "AI Image Generator",
        slug: "text-to-image",
        verified: true,
        kind: Kind::TextToImage,
        inputs: &[],
        max_side: FACE_MAX_SIDE,
        formats: &[],
        output_exts: &["jpg"],
    },
];

/// Other spellings users reach for (the slugs themselves, document titles' short forms).
const ALIASES: &[(&str, &str)] = &[
    ("hairstyle", "hair-style"),
    ("hair-ext", "hair-extension"),
    ("hair-vol", "hair-volume"),
    ("mu-trans-rec", "makeup-transfer"),
    ("makeup", "makeup-transfer"),
    ("obj-removal", "object-removal"),
    ("sod", "background-removal"),
    ("bg-removal", "background-removal"),
    ("enhance", "photo-enhance"),
    ("txt2img", "text-to-image"),
];

/// The feature for a manifest operation (case, `_`/`-` and the aliases above ignored).
pub fn feature(operation: &str) -> Option<&'static Feature> {
    let op = util::fold_operation(operation);
    let name = ALIASES
        .iter()
        .find(|(alias, _)| *alias == op)
        .map_or(op.as_str(), |(_, name)| *name);
    FEATURES.iter().find(|f| f.operation == name)
}

pub fn operation_names() -> Vec<&'static str> {
    FEATURES.iter().map(|f| f.operation).collect()
}

/// Operation → slug, the built-in table with the config file's overrides on top.
#[derive(Debug, Clone, Default)]
pub struct Slugs {
    overrides: BTreeMap<String, String>,
}

impl Slugs {
    /// Checks the overrides: known operations, slugs that fit in a path segment.
    pub fn new(overrides: &BTreeMap<String, String>) -> Result<Slugs, String> {
        let mut out = BTreeMap::new();
        for (op, slug) in overrides {
            let Some(f) = feature(op) else {
                return Err(format!(
                    "perfect: [providers.perfect.operations] names unknown operation {op:?} (known: {})",
                    operation_names().join(", ")
                ));
            };
            let slug = slug.trim();
            let ok = !slug.is_empty()
                && slug
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
            if !ok {
                return Err(format!(
                    "perfect: the slug for {op:?} must be letters, digits, '-', '_' or '.' (got {slug:?})"
                ));
            }
            out.insert(f.operation.to_string(), slug.to_string());
        }
        Ok(Slugs { overrides: out })
    }

    pub fn of(&self, f: &Feature) -> String {
        self.overrides
            .get(f.operation)
            .cloned()
            .unwrap_or_else(|| f.slug.to_string())
    }
}

/// A 64-bit id as the manifest gives it: a JSON integer or a string of digits. Never
/// through `f64` (ids exceed 2^53).
pub fn id_value(name: &str, v: &Value) -> Result<u64, String> {
    let parsed = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
                s.parse::<u64>().ok()
            } else {
                None
            }
        }
        _ => None,
    };
    parsed.ok_or_else(|| {
        format!(
            "{name} must be a whole number id (a JSON integer or a string of digits, as `pixbatch styles perfect` lists them), got {}",
            util::show_value(v)
        )
    })
}

/// A job's request, checked against the document: everything but the file ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub feature: &'static Feature,
    /// The `params` of the one action (`None`: `"actions":[{"id":0}]`).
    pub action_params: Option<Value>,
    pub output_ext: &'static str,
    /// Outputs: the extension of the files written.
    pub ext: &'static str,
}

fn known_params(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Styled => &["style_group_id", "style_id", "style_ids", "output_ext"],
        Kind::Plain => &["output_ext"],
        Kind::Enhance => &["scale", "output_ext"],
        Kind::TextToImage => &[
            "prompt",
            "style_group_id",
            "style_id",
            "style_ids",
            "output_ext",
        ],
    }
}

/// `style_group_id` and one style (`style_id`, or `style_ids` with one entry).
fn style_params(p: &mut Params<'_>) -> Option<(u64, u64)> {
    let group = match p.get("style_group_id") {
        Some(v) => match id_value("style_group_id", v) {
            Ok(g) => Some(g),
            Err(e) => {
                p.errors.push(e);
                None
            }
        },
        None => {
            p.errors.push(
                "style_group_id is required (list groups with `pixbatch styles perfect OPERATION`)"
                    .into(),
            );
            None
        }
    };
    let style = match (p.get("style_id"), p.get("style_ids")) {
        (Some(_), Some(_)) => {
            p.errors.push("give style_id or style_ids, not both".into());
            None
        }
        (Some(v), None) => match id_value("style_id", v) {
            Ok(s) => Some(s),
            Err(e) => {
                p.errors.push(e);
                None
            }
        },
        (None, Some(Value::Array(items))) if items.len() == 1 => {
            match id_value("style_ids[0]", &items[0]) {
                Ok(s) => Some(s),
                Err(e) => {
                    p.errors.push(e);
                    None
                }
            }
        }
        (None, Some(v)) => {
            p.errors.push(format!(
                "style_ids must be a list of exactly one style id (the document: \"Only accept 1 style\"), got {}",
                util::show_value(v)
            ));
            None
        }
        (None, None) => {
            p.errors.push(
                "style_id is required (list styles with `pixbatch styles perfect OPERATION --group ID`)"
                    .into(),
            );
            None
        }
    };
    Some((group?, style?))
}

impl Plan {
    /// Reads the operation, prompt and parameters; lists every problem.
    pub fn from_spec(spec: &JobSpec) -> Result<Plan, Vec<String>> {
        let Some(feature) = feature(&spec.operation) else {
            return Err(vec![format!(
                "unknown perfect operation {:?} (expected one of {})",
                spec.operation,
                operation_names().join(", ")
            )]);
        };
        let map: Map<String, Value> = spec.params();
        let mut p = Params::new(&map);
        p.reject_unknown("perfect", known_params(feature.kind));
        let output_ext = p
            .choice("output_ext", feature.output_exts)
            .unwrap_or(feature.output_exts[0]);
        let action_params = match feature.kind {
            Kind::Plain => None,
            Kind::Styled => {
                style_params(&mut p).map(|(g, s)| json!({"style_group_id": g, "style_ids": [s]}))
            }
            Kind::Enhance => match p.get("scale") {
                None => {
                    p.errors.push("scale is required: 1, 2 or 4".into());
                    None
                }
                Some(v) => match util::integer_in_range("scale", v, 1, 4) {
                    Ok(s) if matches!(s, 1 | 2 | 4) => Some(json!({ "scale": s })),
                    _ => {
                        p.errors.push(format!(
                            "scale must be 1, 2 or 4 (got {})",
                            util::show_value(v)
                        ));
                        None
                    }
                },
            },
            Kind::TextToImage => {
                let prompt = util::prompt_of(spec, &map);
                if p.has("prompt") && !matches!(p.get("prompt"), Some(Value::String(_))) {
                    p.errors.push(format!(
                        "prompt must be a string (got {})",
                        p.get("prompt").map(util::show_value).unwrap_or_default()
                    ));
                }
                if prompt.is_none() {
                    p.errors
                        .push("text-to-image needs a prompt (the prompt column)".into());
                }
                let style = style_params(&mut p);
                match (prompt, style) {
                    (Some(prompt), Some((g, s))) => {
                        Some(json!({"prompt": prompt, "style_group_id": g, "style_ids": [s]}))
                    }
                    _ => None,
                }
            }
        };
        if feature.kind != Kind::TextToImage
            && spec.prompt.as_deref().is_some_and(|s| !s.trim().is_empty())
        {
            p.errors.push(format!(
                "perfect {} takes no prompt (only text-to-image does)",
                feature.operation
            ));
        }
        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Plan {
            feature,
            action_params,
            output_ext,
            ext: output_ext,
        })
    }

    /// The run request's body.
    pub fn run_body(&self, request_id: u64, files: &[(&'static str, String)]) -> Value {
        let action = match &self.action_params {
            Some(params) => json!({"id": 0, "params": params}),
            None => json!({"id": 0}),
        };
        let mut payload = Map::new();
        if !self.feature.inputs.is_empty() {
            let mut sets = Map::new();
            for (field, id) in files {
                sets.insert((*field).to_string(), json!([id]));
            }
            payload.insert("file_sets".into(), Value::Object(sets));
        }
        payload.insert("actions".into(), json!([action]));
        payload.insert("output_ext".into(), json!(self.output_ext));
        json!({"request_id": request_id, "payload": payload})
    }

    /// The checks that need an input's bytes or header: format and long side.
    pub fn check_input(
        &self,
        role: &Role,
        source: &str,
        format: Option<ImageFormat>,
        dims: Option<(u32, u32)>,
    ) -> Vec<String> {
        let f = self.feature;
        let mut errors = Vec::new();
        let names: Vec<&str> = f.formats.iter().map(|x| x.name()).collect();
        match format {
            Some(x) if f.formats.contains(&x) => {}
            Some(x) => errors.push(format!(
                "perfect {} takes {} {} inputs, but the {} {source} is {x}",
                f.operation,
                names.join(" or "),
                role.name,
                role.name
            )),
            None => errors.push(format!(
                "the {} {source} is not an image format pixbatch recognises",
                role.name
            )),
        }
        if let Some((w, h)) = dims {
            if w.max(h) > f.max_side {
                errors.push(format!(
                    "perfect {} takes images whose long side is at most {} pixels; the {} {source} is {w}x{h}",
                    f.operation, f.max_side, role.name
                ));
            }
            if w == 0 || h == 0 {
                errors.push(format!(
                    "the {} {source} has no pixels ({w}x{h})",
                    role.name
                ));
            }
        }
        errors
    }
}

/// Checks a Perfect job against the document before any request is made.
pub fn validate(spec: &JobSpec) -> Vec<String> {
    let plan = match Plan::from_spec(spec) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let f = plan.feature;
    let mut errors = Vec::new();
    let inputs: Vec<&str> = spec
        .inputs
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if inputs.len() != f.inputs.len() {
        let want = match f.inputs {
            [] => "no input image".to_string(),
            [one] => format!("one input image ({})", one.name),
            many => format!(
                "{} input images ({}, joined by |)",
                many.len(),
                many.iter().map(|r| r.name).collect::<Vec<_>>().join("|")
            ),
        };
        errors.push(format!(
            "perfect {} takes {want}, got {}",
            f.operation,
            inputs.len()
        ));
        return errors;
    }
    let mut dims_seen: Vec<Option<(u32, u32)>> = Vec::new();
    for (role, source) in f.inputs.iter().zip(&inputs) {
        if util::is_url(source) {
            if url::Url::parse(source).map_or(true, |u| u.host_str().is_none_or(str::is_empty)) {
                errors.push(format!("input {source} is not a valid URL"));
            }
            dims_seen.push(None);
            continue;
        }
        match util::inspect_local(source, u64::MAX) {
            Ok(info) => {
                if info.size > MAX_INPUT_BYTES {
                    errors.push(format!(
                        "the {} {source} is {}; perfect takes inputs under 10 MB",
                        role.name,
                        util::human_bytes(info.size)
                    ));
                }
                errors.extend(plan.check_input(role, source, info.format, info.dimensions));
                dims_seen.push(info.dimensions);
            }
            Err(e) => {
                errors.push(e);
                dims_seen.push(None);
            }
        }
    }
    if let Some(problem) = mask_size_problem(f, &dims_seen) {
        errors.push(problem);
    }
    errors
}

/// Object removal: "a grey scale mask image with the exact same width and height".
pub fn mask_size_problem(f: &Feature, dims: &[Option<(u32, u32)>]) -> Option<String> {
    let mask_at = f.inputs.iter().position(|r| r.field == "mask_ids")?;
    let (Some(Some(image)), Some(Some(mask))) = (dims.first(), dims.get(mask_at)) else {
        return None;
    };
    (image != mask).then(|| {
        format!(
            "the mask must be the same size as the image: the image is {}x{}, the mask {}x{}",
            image.0, image.1, mask.0, mask.1
        )
    })
}

/// Rate-limited requests a typical job makes: file create, run, about three polls
/// (the access token's renewals are shared by thousands of jobs).
pub fn requests_per_job(spec: &JobSpec) -> u32 {
    match feature(&spec.operation).map(|f| f.kind) {
        Some(Kind::TextToImage) => 4,
        Some(_) => 5,
        None => 1,
    }
}
