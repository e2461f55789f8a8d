//! Topaz Labs Image API (`https://api.topazlabs.com/image/v1`).
//!
//! Operations: `enhance` (`POST /enhance/async`), `enhance-sync` (`POST /enhance`, the
//! answer body is the image) and `enhance-gen` (`POST /enhance-gen/async`). One input,
//! sent as the multipart part `image` named `<submit_key>.<ext>`: the status list
//! (`GET /status`) echoes that file name, which is how a submission whose answer was
//! lost is found again ([`Provider::reconcile`]).
//!
//! Async tasks are polled with `GET /status/{id}`; a finished one is fetched through
//! `GET /download/{id}`, which hands out a fresh presigned link (valid one hour) each
//! time it is asked, for 24 hours.

use async_trait::async_trait;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::multipart::{Form, Part};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::Value;

use super::util::{self, ImageFormat, Params};
use super::{
    Api, Balance, JobContext, OutputData, PollOutcome, Provider, ProviderError, Reconciliation,
    RequestKind, SubmitOutcome,
};
use crate::api::{excerpt, MAX_JSON_ANSWER};
use crate::model::{JobSpec, PendingOutput, ProviderKind};

/// Keys starting with this (the document's "uncommon, deprecating soon" kind) go as
/// `Authorization: Bearer`; all others as `X-API-Key`.
pub const LEGACY_KEY_PREFIX: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJtYWNoaW5lX2lkIjoi";

/// "The API enforces a request size limit of 500MB" (413 beyond).
pub const MAX_REQUEST_BYTES: u64 = 500_000_000;
/// The image part may use all of the request but a margin for the other form fields.
pub const MAX_INPUT_BYTES: u64 = MAX_REQUEST_BYTES - 64 * 1024;
/// The largest synchronous answer read into memory (96 MP as an uncompressed TIFF,
/// 16 bits per channel with alpha, is about 770 MB).
const MAX_SYNC_ANSWER: u64 = 1024 * 1024 * 1024;
/// A small JSON answer (submission, status, download link, estimate).
const MAX_SMALL_JSON: u64 = 1024 * 1024;

const MEGAPIXEL: u64 = 1_000_000;
/// `Recovery` takes inputs of at most 16 MP.
const RECOVERY_MAX_INPUT_MP: u64 = 16;
/// Output sides, per the `ProcessRequest` schema.
const MAX_SIDE: i64 = 32000;
/// "text - max 1024 characters".
const MAX_PROMPT_CHARS: usize = 1024;

/// `/enhance` models: the document's five, and `Upscale High Fidelity V3` from the
/// current model pages (docs/providers.md, "Topaz live evidence").
const ENHANCE_MODELS: &[&str] = &[
    "Standard V2",
    "Low Resolution V2",
    "CGI",
    "High Fidelity V2",
    "Text Refine",
    "Upscale High Fidelity V3",
];
/// `/enhance-gen` models: the document's two, the OpenAPI document's
/// (`Standard MAX`, `Recovery V2`, `Wonder`) and the current model pages'.
const GEN_MODELS: &[&str] = &[
    "Redefine",
    "Recovery",
    "Recovery V2",
    "Standard MAX",
    "Wonder",
    "Wonder 2",
    "Wonder 3",
    "Wonder 3.5",
    "Recover 3",
    "Bloom 2",
    "Bloom Realism",
];
const OUTPUT_FORMATS: &[&str] = &["jpeg", "jpg", "png", "tiff", "tif"];
/// `subject_detection`: where the enhancement applies.
const SUBJECT_DETECTION: &[&str] = &["foreground", "background", "all"];
/// The highest `creativity` on `/enhance-gen` (the newer route; the document said 6).
const MAX_CREATIVITY: i64 = 9;
/// `Bloom Realism` narrows it.
const BLOOM_REALISM_MAX_CREATIVITY: i64 = 4;
/// Every parameter name pixbatch knows for Topaz. Others pass with a warning and are
/// sent as they are: Topaz documents that parameters a model does not use are
/// ignored, and new models bring new ones.
const KNOWN_PARAMS: &[&str] = &[
    "model",
    "output_width",
    "output_height",
    "output_format",
    "crop_to_fill",
    "face_enhancement",
    "face_enhancement_strength",
    "face_enhancement_creativity",
    "subject_detection",
    "denoise",
    "sharpen",
    "fix_compression",
    "strength",
    "creativity",
    "texture",
    "prompt",
    "autoprompt",
    "detail",
    "options_json",
];

/// Which Topaz endpoint an operation goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /enhance/async`.
    Enhance,
    /// `POST /enhance`: synchronous, the answer is the image.
    EnhanceSync,
    /// `POST /enhance-gen/async`.
    EnhanceGen,
    /// `POST /sharpen/async` (and the synchronous `/sharpen`).
    Sharpen,
    SharpenSync,
    /// `POST /sharpen-gen/async`.
    SharpenGen,
    /// `POST /denoise/async` (and the synchronous `/denoise`).
    Denoise,
    DenoiseSync,
    /// `POST /restore-gen/async`.
    RestoreGen,
    /// `POST /lighting/async` (and the synchronous `/lighting`).
    Lighting,
    LightingSync,
}

/// A setting of the filter endpoints (sharpen, denoise, restore, lighting).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Setting {
    Number(f64, f64),
    Integer(i64, i64),
    Boolean,
}

/// Per filter model: the settings it reads (the model pages' tables, as copied in
/// olereon/GigaUp `available_models.md`).
pub type FilterModels = &'static [(&'static str, &'static [&'static str])];

const SHARPEN_MODELS: FilterModels = &[
    ("Standard", &["strength", "minor_denoise"]),
    ("Strong", &["strength"]),
    ("Lens Blur", &["strength", "minor_denoise"]),
    ("Lens Blur V2", &["strength", "minor_denoise"]),
    ("Motion Blur", &["strength", "minor_denoise"]),
    ("Natural", &["strength", "minor_denoise"]),
    ("Refocus", &["strength", "minor_denoise"]),
];
const SHARPEN_SETTINGS: &[(&str, Setting)] = &[
    ("strength", Setting::Number(0.01, 1.0)),
    ("minor_denoise", Setting::Number(0.01, 1.0)),
];
const SHARPEN_GEN_MODELS: FilterModels = &[
    ("Super Focus", &["strength", "focus_boost", "seed"]),
    ("Super Focus V2", &["detail", "focus_boost"]),
];
const SHARPEN_GEN_SETTINGS: &[(&str, Setting)] = &[
    ("strength", Setting::Number(0.0, 1.0)),
    ("detail", Setting::Number(0.0, 1.0)),
    ("focus_boost", Setting::Number(0.25, 1.0)),
    ("seed", Setting::Integer(-2_147_483_648, 2_147_483_647)),
];
const DENOISE_MODELS: FilterModels = &[
    ("Normal", &["strength", "minor_deblur", "original_detail"]),
    ("Strong", &["strength", "minor_deblur", "original_detail"]),
    ("Extreme", &["strength", "minor_deblur", "original_detail"]),
];
const DENOISE_SETTINGS: &[(&str, Setting)] = &[
    ("strength", Setting::Number(0.01, 1.0)),
    ("minor_deblur", Setting::Number(0.01, 1.0)),
    ("original_detail", Setting::Number(0.0, 1.0)),
];
const RESTORE_MODELS: FilterModels = &[("Dust-Scratch", &[])];
const LIGHTING_MODELS: FilterModels = &[
    (
        "Adjust",
        &["color_correction", "exposure", "highlight", "shadow"],
    ),
    ("White Balance", &["temperature", "opacity"]),
];
const LIGHTING_SETTINGS: &[(&str, Setting)] = &[
    ("color_correction", Setting::Boolean),
    ("exposure", Setting::Number(0.0, 2.0)),
    ("highlight", Setting::Number(0.0, 2.0)),
    ("shadow", Setting::Number(0.0, 2.0)),
    ("temperature", Setting::Number(0.01, 1.0)),
    ("opacity", Setting::Number(0.01, 1.0)),
];

impl Endpoint {
    pub const ALL: [Endpoint; 11] = [
        Endpoint::Enhance,
        Endpoint::EnhanceSync,
        Endpoint::EnhanceGen,
        Endpoint::Sharpen,
        Endpoint::SharpenSync,
        Endpoint::SharpenGen,
        Endpoint::Denoise,
        Endpoint::DenoiseSync,
        Endpoint::RestoreGen,
        Endpoint::Lighting,
        Endpoint::LightingSync,
    ];

    pub fn from_operation(op: &str) -> Option<Endpoint> {
        match util::fold_operation(op).as_str() {
            "enhance" | "enhance-async" => Some(Endpoint::Enhance),
            "enhance-sync" => Some(Endpoint::EnhanceSync),
            "enhance-gen" | "enhance-gen-async" => Some(Endpoint::EnhanceGen),
            "sharpen" | "sharpen-async" => Some(Endpoint::Sharpen),
            "sharpen-sync" => Some(Endpoint::SharpenSync),
            "sharpen-gen" | "sharpen-gen-async" => Some(Endpoint::SharpenGen),
            "denoise" | "denoise-async" => Some(Endpoint::Denoise),
            "denoise-sync" => Some(Endpoint::DenoiseSync),
            // Restoration exists only as the generative route.
            "restore" | "restore-gen" | "restore-gen-async" => Some(Endpoint::RestoreGen),
            "lighting" | "lighting-async" => Some(Endpoint::Lighting),
            "lighting-sync" => Some(Endpoint::LightingSync),
            _ => None,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Enhance => "/enhance/async",
            Endpoint::EnhanceSync => "/enhance",
            Endpoint::EnhanceGen => "/enhance-gen/async",
            Endpoint::Sharpen => "/sharpen/async",
            Endpoint::SharpenSync => "/sharpen",
            Endpoint::SharpenGen => "/sharpen-gen/async",
            Endpoint::Denoise => "/denoise/async",
            Endpoint::DenoiseSync => "/denoise",
            Endpoint::RestoreGen => "/restore-gen/async",
            Endpoint::Lighting => "/lighting/async",
            Endpoint::LightingSync => "/lighting",
        }
    }

    /// The synchronous endpoints answer with the image itself.
    pub fn is_sync(self) -> bool {
        matches!(
            self,
            Endpoint::EnhanceSync
                | Endpoint::SharpenSync
                | Endpoint::DenoiseSync
                | Endpoint::LightingSync
        )
    }

    /// `/estimate` and `/estimate-gen` are documented for the enhance routes only.
    pub fn estimate_path(self) -> Option<&'static str> {
        match self {
            Endpoint::Enhance | Endpoint::EnhanceSync => Some("/estimate"),
            Endpoint::EnhanceGen => Some("/estimate-gen"),
            _ => None,
        }
    }

    /// The filter endpoints' models and settings; `None` for the enhance routes.
    pub fn filter(self) -> Option<(FilterModels, &'static [(&'static str, Setting)])> {
        match self {
            Endpoint::Sharpen | Endpoint::SharpenSync => Some((SHARPEN_MODELS, SHARPEN_SETTINGS)),
            Endpoint::SharpenGen => Some((SHARPEN_GEN_MODELS, SHARPEN_GEN_SETTINGS)),
            Endpoint::Denoise | Endpoint::DenoiseSync => Some((DENOISE_MODELS, DENOISE_SETTINGS)),
            Endpoint::RestoreGen => Some((RESTORE_MODELS, &[])),
            Endpoint::Lighting | Endpoint::LightingSync => {
                Some((LIGHTING_MODELS, LIGHTING_SETTINGS))
            }
            _ => None,
        }
    }

    pub fn models(self) -> Vec<&'static str> {
        match self {
            Endpoint::Enhance | Endpoint::EnhanceSync => ENHANCE_MODELS.to_vec(),
            Endpoint::EnhanceGen => GEN_MODELS.to_vec(),
            other => other
                .filter()
                .map(|(m, _)| m.iter().map(|(name, _)| *name).collect())
                .unwrap_or_default(),
        }
    }

    pub fn default_model(self) -> &'static str {
        match self {
            Endpoint::Enhance | Endpoint::EnhanceSync => "Standard V2",
            Endpoint::EnhanceGen => "Redefine",
            Endpoint::SharpenGen => "Super Focus V2",
            other => other
                .filter()
                .and_then(|(m, _)| m.first().map(|(name, _)| *name))
                .unwrap_or("Standard"),
        }
    }

    /// The largest output the endpoint produces, in megapixels.
    pub fn max_output_mp(self) -> u64 {
        match self {
            Endpoint::EnhanceGen => 256,
            e if e.is_sync() => 96,
            _ => 512,
        }
    }

    /// Whether the output keeps the input's size (everything but enhance).
    pub fn keeps_size(self) -> bool {
        self.filter().is_some()
    }

    pub fn is_generative(self) -> bool {
        matches!(
            self,
            Endpoint::EnhanceGen | Endpoint::SharpenGen | Endpoint::RestoreGen
        )
    }

    pub fn operation(self) -> &'static str {
        match self {
            Endpoint::Enhance => "enhance",
            Endpoint::EnhanceSync => "enhance-sync",
            Endpoint::EnhanceGen => "enhance-gen",
            Endpoint::Sharpen => "sharpen",
            Endpoint::SharpenSync => "sharpen-sync",
            Endpoint::SharpenGen => "sharpen-gen",
            Endpoint::Denoise => "denoise",
            Endpoint::DenoiseSync => "denoise-sync",
            Endpoint::RestoreGen => "restore-gen",
            Endpoint::Lighting => "lighting",
            Endpoint::LightingSync => "lighting-sync",
        }
    }
}

/// The model settings each model reads, per the document's and the model pages'
/// tables. A setting outside its model's list passes with a warning: Topaz ignores
/// it, so the user would pay for a result without it.
fn model_params(model: &str) -> &'static [&'static str] {
    match model {
        "CGI" => &["denoise", "sharpen", "strength"],
        "Redefine" => &[
            "prompt",
            "autoprompt",
            "creativity",
            "texture",
            "denoise",
            "sharpen",
        ],
        "Recovery" | "Recovery V2" => &["detail"],
        m if GEN_MODELS.contains(&m) => &[
            "prompt",
            "autoprompt",
            "creativity",
            "texture",
            "denoise",
            "sharpen",
            "detail",
        ],
        _ => &["denoise", "sharpen", "fix_compression", "strength"],
    }
}

/// The file extension for an `output_format` value.
fn ext_of_format(format: &str) -> Option<&'static str> {
    match format.trim().to_ascii_lowercase().as_str() {
        "jpeg" | "jpg" => Some("jpg"),
        "png" => Some("png"),
        "tiff" | "tif" => Some("tiff"),
        _ => None,
    }
}

/// A job's request, checked against the document's limits: everything but the image.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub endpoint: Endpoint,
    /// A known model's own spelling, or an unknown one as given (with a warning).
    pub model: String,
    pub output_width: Option<u32>,
    pub output_height: Option<u32>,
    /// Extension of the result (`jpg` unless `output_format` says otherwise).
    pub ext: &'static str,
    /// The form fields to send besides `image`, in order.
    pub fields: Vec<(String, String)>,
    /// What passes but pixbatch does not know (see [`super::Findings`]).
    pub warnings: Vec<String>,
}

/// A parameter pixbatch does not know, as the form field Topaz would read.
fn passthrough(name: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!(
            "topaz parameter {name} must be a string, number or boolean: form fields are text (got {})",
            util::show_value(other)
        )),
    }
}

impl Plan {
    /// Reads the operation, prompt and parameters. Needs no file: every problem
    /// found in the manifest alone is listed.
    pub fn from_spec(spec: &JobSpec) -> Result<Plan, Vec<String>> {
        let Some(endpoint) = Endpoint::from_operation(&spec.operation) else {
            let all: Vec<&str> = Endpoint::ALL.iter().map(|e| e.operation()).collect();
            return Err(vec![format!(
                "unknown topaz operation {:?} (expected one of {})",
                spec.operation,
                all.join(", ")
            )]);
        };
        if let Some((models, settings)) = endpoint.filter() {
            return Plan::filter_from_spec(spec, endpoint, models, settings);
        }
        let params = spec.params();
        let map = &params;
        let mut p = Params::new(map);
        let mut warnings = Vec::new();
        let mut extra: Vec<(String, String)> = Vec::new();
        for (name, v) in map.iter() {
            if KNOWN_PARAMS.contains(&name.as_str()) {
                continue;
            }
            let mut msg = format!("topaz parameter {name:?} is not one pixbatch knows; sent as given (Topaz ignores parameters a model does not use)");
            if let Some(s) = util::suggest(name, KNOWN_PARAMS) {
                msg.push_str(&format!("; did you mean {s:?}?"));
            }
            match passthrough(name, v) {
                Ok(text) => {
                    warnings.push(msg);
                    extra.push((name.clone(), text));
                }
                Err(e) => p.errors.push(e),
            }
        }

        // A model pixbatch does not know passes with a warning, sent as written: new
        // models appear on Topaz's pages faster than pixbatch is released, and an
        // answer refusing it fails the job with Topaz's reason, before any charge.
        let model: Option<(String, bool)> = match p.get("model") {
            None => Some((endpoint.default_model().to_string(), true)),
            Some(v) => match util::one_of("model", v, &endpoint.models()) {
                Ok(m) => Some((m.to_string(), true)),
                Err(_) => match v {
                    Value::String(s) if !s.trim().is_empty() && s.trim().len() <= 128 => {
                        let other = match endpoint {
                            Endpoint::EnhanceGen => ENHANCE_MODELS,
                            _ => GEN_MODELS,
                        };
                        let hint = match util::one_of("model", v, other) {
                            Ok(m) => format!(
                                "; {m:?} is a model of {}",
                                match endpoint {
                                    Endpoint::EnhanceGen => "operation enhance",
                                    _ => "operation enhance-gen",
                                }
                            ),
                            Err(_) => String::new(),
                        };
                        warnings.push(format!(
                            "topaz model {:?} is not one pixbatch knows for {} (known: {}); sent as given{hint}",
                            s.trim(),
                            endpoint.operation(),
                            endpoint.models().join(", ")
                        ));
                        Some((s.trim().to_string(), false))
                    }
                    other => {
                        p.errors.push(format!(
                            "model must be a model name for {} (got {})",
                            endpoint.operation(),
                            util::show_value(other)
                        ));
                        None
                    }
                },
            },
        };

        let mut fields: Vec<(String, String)> = Vec::new();
        if let Some((m, _)) = &model {
            fields.push(("model".into(), m.clone()));
        }
        let output_width = p.integer("output_width", 1, MAX_SIDE).map(|v| v as u32);
        let output_height = p.integer("output_height", 1, MAX_SIDE).map(|v| v as u32);
        if let Some(w) = output_width {
            fields.push(("output_width".into(), w.to_string()));
        }
        if let Some(h) = output_height {
            fields.push(("output_height".into(), h.to_string()));
        }
        let format = p.choice("output_format", OUTPUT_FORMATS).unwrap_or("jpeg");
        fields.push(("output_format".into(), format.to_string()));
        let ext = ext_of_format(format).unwrap_or("jpg");
        let mut face = None;
        for name in ["crop_to_fill", "face_enhancement"] {
            if let Some(b) = p.boolean(name) {
                fields.push((name.into(), b.to_string()));
                if name == "face_enhancement" {
                    face = Some(b);
                }
            }
        }
        let face_strength = p.number("face_enhancement_strength", 0.0, 1.0);
        let face_creativity = p.number("face_enhancement_creativity", 0.0, 1.0);
        // The model pages: both strengths are "required if face_enhancement=true". The
        // strength has no documented default, so a request without it is refused
        // here; the creativity has one in the document (0), so it only warns.
        if face == Some(true) {
            if face_strength.is_none() && !p.has("face_enhancement_strength") {
                p.errors.push(
                    "face_enhancement = true needs face_enhancement_strength (a number from 0 to 1): Topaz requires it with face enhancement".into(),
                );
            }
            if face_creativity.is_none() && !p.has("face_enhancement_creativity") {
                warnings.push("face_enhancement = true without face_enhancement_creativity: the model pages call it required, the document defaults it to 0".into());
            }
        }
        if let Some(x) = face_strength {
            fields.push(("face_enhancement_strength".into(), util::fmt_num(x)));
        }
        if let Some(x) = face_creativity {
            fields.push(("face_enhancement_creativity".into(), util::fmt_num(x)));
        }
        if let Some(c) = p.choice("subject_detection", SUBJECT_DETECTION) {
            fields.push(("subject_detection".into(), c.to_string()));
        }

        // Model settings: checked for range everywhere; one a known model does not
        // read passes with a warning (Topaz ignores it: the result comes without it).
        let mut settings: Vec<(&'static str, String)> = Vec::new();
        for name in ["denoise", "sharpen", "fix_compression"] {
            if let Some(x) = p.number(name, 0.0, 1.0) {
                settings.push((name, util::fmt_num(x)));
            }
        }
        if let Some(x) = p.number("strength", 0.01, 1.0) {
            settings.push(("strength", util::fmt_num(x)));
        }
        let max_creativity = match model.as_ref().map(|(m, _)| m.as_str()) {
            Some("Bloom Realism") => BLOOM_REALISM_MAX_CREATIVITY,
            _ => MAX_CREATIVITY,
        };
        if let Some(c) = p.integer("creativity", 1, max_creativity) {
            settings.push(("creativity", c.to_string()));
        }
        if let Some(t) = p.integer("texture", 1, 5) {
            settings.push(("texture", t.to_string()));
        }
        if let Some(b) = p.boolean("autoprompt") {
            settings.push(("autoprompt", b.to_string()));
        }
        // `detail`: a decimal 0..1 on the Recovery pages, a boolean on the newer ones.
        match p.get("detail") {
            None => {}
            Some(Value::Bool(b)) => settings.push(("detail", b.to_string())),
            Some(_) => {
                if let Some(x) = p.number("detail", 0.0, 1.0) {
                    settings.push(("detail", util::fmt_num(x)));
                }
            }
        }
        let prompt = util::prompt_of(spec, map);
        if p.has("prompt") && !matches!(p.get("prompt"), Some(Value::String(_))) {
            p.errors.push(format!(
                "prompt must be a string (got {})",
                p.get("prompt").map(util::show_value).unwrap_or_default()
            ));
        }
        if let Some(text) = &prompt {
            match util::text(
                "prompt",
                &Value::String(text.clone()),
                Some(MAX_PROMPT_CHARS),
            ) {
                Ok(t) => settings.push(("prompt", t)),
                Err(e) => p.errors.push(e),
            }
        }
        if let Some((m, true)) = &model {
            let usable = model_params(m);
            for (name, _) in &settings {
                if !usable.contains(name) {
                    let what = if *name == "prompt"
                        && spec.prompt.as_deref().is_some_and(|s| !s.trim().is_empty())
                    {
                        "a prompt (the prompt column)".to_string()
                    } else {
                        format!("parameter {name}")
                    };
                    let takes = if usable.is_empty() {
                        "it takes no model settings".to_string()
                    } else {
                        format!("it takes {}", usable.join(", "))
                    };
                    let hint = match (*name, endpoint) {
                        (
                            "prompt" | "creativity" | "texture" | "autoprompt",
                            Endpoint::Enhance | Endpoint::EnhanceSync,
                        ) => "; use operation enhance-gen (e.g. model Redefine)",
                        _ => "",
                    };
                    warnings.push(format!(
                        "topaz model {m:?} does not use {what} (Topaz ignores it): {takes}{hint}"
                    ));
                }
            }
        }
        fields.extend(settings.into_iter().map(|(n, v)| (n.to_string(), v)));

        if let Some(v) = p.get("options_json") {
            match v {
                Value::Object(_) => fields.push(("options_json".into(), v.to_string())),
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(Value::Object(_)) => fields.push(("options_json".into(), s.clone())),
                    _ => p.errors.push(format!(
                        "options_json must be a JSON object (got {})",
                        util::show_value(v)
                    )),
                },
                other => p.errors.push(format!(
                    "options_json must be a JSON object or a string holding one (got {})",
                    util::show_value(other)
                )),
            }
        }
        fields.extend(extra);

        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Plan {
            endpoint,
            model: model.map_or_else(|| endpoint.default_model().to_string(), |(m, _)| m),
            output_width,
            output_height,
            ext,
            fields,
            warnings,
        })
    }

    /// A sharpen, denoise, restore or lighting job: a model of the endpoint's and its
    /// settings, checked against the model pages' ranges. The output keeps the
    /// input's size. As for enhance, an unknown model or parameter passes with a
    /// warning and is sent as given.
    fn filter_from_spec(
        spec: &JobSpec,
        endpoint: Endpoint,
        models: FilterModels,
        settings: &'static [(&'static str, Setting)],
    ) -> Result<Plan, Vec<String>> {
        let params = spec.params();
        let mut p = Params::new(&params);
        let mut warnings = Vec::new();
        let op = endpoint.operation();
        let names: Vec<&'static str> = models.iter().map(|(m, _)| *m).collect();
        let model: (String, Option<&'static [&'static str]>) = match p.get("model") {
            None => {
                let m = endpoint.default_model();
                (
                    m.to_string(),
                    models.iter().find(|(n, _)| *n == m).map(|(_, s)| *s),
                )
            }
            Some(v) => match util::one_of("model", v, &names) {
                Ok(m) => (
                    m.to_string(),
                    models.iter().find(|(n, _)| *n == m).map(|(_, s)| *s),
                ),
                Err(_) => match v {
                    Value::String(s) if !s.trim().is_empty() && s.trim().len() <= 128 => {
                        warnings.push(format!(
                            "topaz model {:?} is not one pixbatch knows for {op} (known: {}); sent as given",
                            s.trim(),
                            names.join(", ")
                        ));
                        (s.trim().to_string(), None)
                    }
                    other => {
                        p.errors.push(format!(
                            "model must be a model name for {op} (got {})",
                            util::show_value(other)
                        ));
                        (endpoint.default_model().to_string(), None)
                    }
                },
            },
        };
        let mut fields: Vec<(String, String)> = vec![("model".into(), model.0.clone())];
        let format = p.choice("output_format", OUTPUT_FORMATS).unwrap_or("jpeg");
        fields.push(("output_format".into(), format.to_string()));
        let ext = ext_of_format(format).unwrap_or("jpg");
        for (name, kind) in settings {
            let value = match kind {
                Setting::Number(lo, hi) => p.number(name, *lo, *hi).map(util::fmt_num),
                Setting::Integer(lo, hi) => p.integer(name, *lo, *hi).map(|i| i.to_string()),
                Setting::Boolean => p.boolean(name).map(|b| b.to_string()),
            };
            let Some(value) = value else { continue };
            if let Some(usable) = model.1 {
                if !usable.contains(name) {
                    let takes = if usable.is_empty() {
                        "it takes no settings".to_string()
                    } else {
                        format!("it takes {}", usable.join(", "))
                    };
                    warnings.push(format!(
                        "topaz model {:?} does not use parameter {name} (Topaz ignores it): {takes}",
                        model.0
                    ));
                }
            }
            fields.push((name.to_string(), value));
        }
        let known: Vec<&str> = ["model", "output_format"]
            .into_iter()
            .chain(settings.iter().map(|(n, _)| *n))
            .collect();
        for (name, v) in params.iter() {
            if known.contains(&name.as_str()) {
                continue;
            }
            let mut msg = format!(
                "topaz parameter {name:?} is not one pixbatch knows for {op}; sent as given (Topaz ignores parameters a model does not use)"
            );
            if let Some(s) = util::suggest(name, &known) {
                msg.push_str(&format!("; did you mean {s:?}?"));
            }
            match passthrough(name, v) {
                Ok(text) => {
                    warnings.push(msg);
                    fields.push((name.clone(), text));
                }
                Err(e) => p.errors.push(e),
            }
        }
        if util::prompt_of(spec, &params).is_some_and(|t| !t.trim().is_empty()) {
            warnings.push(format!(
                "topaz {op} takes no prompt; the prompt column is not sent"
            ));
        }
        if !p.errors.is_empty() {
            return Err(p.errors);
        }
        Ok(Plan {
            endpoint,
            model: model.0,
            output_width: None,
            output_height: None,
            ext,
            fields,
            warnings,
        })
    }

    /// The output size the request asks for, given the input size: both sides when
    /// both are set, the other scaled proportionally when one is. `None` when neither
    /// is set (Topaz's autopilot decides; no guessing here).
    pub fn output_size(&self, input: (u32, u32)) -> Option<(u64, u64)> {
        let (iw, ih) = (u64::from(input.0.max(1)), u64::from(input.1.max(1)));
        match (self.output_width, self.output_height) {
            (Some(w), Some(h)) => Some((u64::from(w), u64::from(h))),
            (Some(w), None) => Some((u64::from(w), (ih * u64::from(w) + iw / 2) / iw)),
            (None, Some(h)) => Some(((iw * u64::from(h) + ih / 2) / ih, u64::from(h))),
            (None, None) => None,
        }
    }

    /// The checks that need the input: its format and the megapixel limits.
    pub fn check_input(
        &self,
        format: Option<ImageFormat>,
        dims: Option<(u32, u32)>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        match format {
            Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::Tiff) => {}
            Some(other) => {
                errors.push(format!("topaz takes JPEG, PNG or TIFF inputs, not {other}"))
            }
            None => errors
                .push("topaz takes JPEG, PNG or TIFF inputs; the input is none of them".into()),
        }
        let Some((iw, ih)) = dims else {
            return errors;
        };
        let input_px = u64::from(iw) * u64::from(ih);
        if self.model == "Recovery" && input_px > RECOVERY_MAX_INPUT_MP * MEGAPIXEL {
            errors.push(format!(
                "the Recovery model takes inputs of at most {RECOVERY_MAX_INPUT_MP} megapixels; the input is {iw}x{ih} ({})",
                mp(input_px)
            ));
        }
        let size = if self.endpoint.keeps_size() {
            Some((u64::from(iw), u64::from(ih)))
        } else {
            self.output_size((iw, ih))
        };
        if let Some((ow, oh)) = size {
            let max = self.endpoint.max_output_mp();
            if ow * oh > max * MEGAPIXEL {
                let hint = match self.endpoint {
                    Endpoint::EnhanceSync => " (use operation enhance, which allows 512 MP)",
                    e if e.is_sync() => " (use the asynchronous operation, which allows 512 MP)",
                    _ => "",
                };
                errors.push(format!(
                    "topaz {} outputs at most {max} megapixels; {ow}x{oh} is {}{hint}",
                    self.endpoint.operation(),
                    mp(ow * oh)
                ));
            }
            if ow > MAX_SIDE as u64 || oh > MAX_SIDE as u64 {
                errors.push(format!(
                    "topaz outputs at most {MAX_SIDE} pixels a side; the other side scales to {ow}x{oh}"
                ));
            }
        }
        errors
    }
}

fn mp(px: u64) -> String {
    format!("{:.1} MP", px as f64 / MEGAPIXEL as f64)
}

/// Checks a Topaz job against the document before any request is made (errors only).
pub fn validate(spec: &JobSpec) -> Vec<String> {
    check(spec).errors
}

/// [`validate`] with the warnings: what pixbatch does not know but Topaz may accept.
pub fn check(spec: &JobSpec) -> super::Findings {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let plan = match Plan::from_spec(spec) {
        Ok(plan) => {
            warnings.extend(plan.warnings.iter().cloned());
            Some(plan)
        }
        Err(e) => {
            errors.extend(e);
            None
        }
    };
    let local = util::check_single_input(spec, MAX_INPUT_BYTES, &mut errors);
    if let (Some(plan), Some(info)) = (plan, local) {
        if info.format.is_some() {
            errors.extend(plan.check_input(info.format, info.dimensions));
        }
    }
    super::Findings { errors, warnings }
}

/// Output megapixels one credit buys, per model family (developer.topazlabs.com
/// "model pricing": Gigapixel 24, Wonder 4, Bloom 2; as transcribed and checked
/// against every per-model table in file id 60049032122). `None`: no table.
fn megapixels_per_credit(endpoint: Endpoint, model: &str) -> Option<f64> {
    match endpoint {
        Endpoint::Enhance | Endpoint::EnhanceSync if ENHANCE_MODELS.contains(&model) => Some(24.0),
        Endpoint::EnhanceGen => match model {
            "Redefine" | "Wonder" | "Wonder 2" | "Wonder 3" | "Wonder 3.5" | "Standard MAX"
            | "Recover 3" => Some(4.0),
            "Bloom 2" | "Bloom Realism" => Some(2.0),
            _ => None,
        },
        _ => None,
    }
}

/// A job's credits from the published tables, with no request: `ceil(output MP /
/// MP per credit)`. Needs the output size: both sides given, or one and a local
/// input to scale the other from. `None` otherwise (Topaz's autopilot picks the
/// size, or the model has no table): then `/estimate` is asked.
pub fn table_credits(spec: &JobSpec) -> Option<f64> {
    let plan = Plan::from_spec(spec).ok()?;
    let per_credit = megapixels_per_credit(plan.endpoint, &plan.model)?;
    let (w, h) = match (plan.output_width, plan.output_height) {
        (Some(w), Some(h)) => (u64::from(w), u64::from(h)),
        (None, None) => return None,
        _ => {
            let input = spec.inputs.first()?;
            if util::is_url(input) {
                return None;
            }
            let dims = util::dimensions_of_file(std::path::Path::new(input.trim()))?;
            plan.output_size(dims)?
        }
    };
    let mp = (w * h) as f64 / MEGAPIXEL as f64;
    (mp > 0.0).then(|| (mp / per_credit).ceil())
}

/// Requests a typical job makes: the submission, a few polls, a download link and
/// the status cleanup (the synchronous endpoint needs no polls and no link).
pub fn requests_per_job(spec: &JobSpec) -> u32 {
    match Endpoint::from_operation(&spec.operation) {
        Some(e) if e.is_sync() => 2,
        Some(e) if e.is_generative() => 8,
        Some(_) => 5,
        None => 1,
    }
}

/// What `POST /estimate` says a job would take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// Estimated processing time in seconds.
    pub duration_s: u64,
    /// Credits the job would consume (optional in the document's schema).
    pub credits: Option<u64>,
}

/// The Topaz adapter.
pub struct Topaz {
    api_key: String,
    /// Statuses per page of `GET /status?paginated=true` (the API's maximum, 100;
    /// smaller in tests).
    status_page: u32,
}

/// The most pages of the status list read for one reconciliation (100 000 statuses
/// at 100 a page); past that nothing is concluded.
const MAX_STATUS_PAGES: u32 = 1000;

impl std::fmt::Debug for Topaz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topaz")
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl Topaz {
    pub fn new(api_key: String) -> Topaz {
        Topaz {
            api_key: api_key.trim().to_string(),
            status_page: 100,
        }
    }

    fn auth_header(&self) -> Result<(HeaderName, HeaderValue), ProviderError> {
        if self.api_key.starts_with(LEGACY_KEY_PREFIX) {
            let value = util::secret_header("TOPAZ_API_KEY", &format!("Bearer {}", self.api_key))?;
            Ok((AUTHORIZATION, value))
        } else {
            let value = util::secret_header("TOPAZ_API_KEY", &self.api_key)?;
            Ok((HeaderName::from_static("x-api-key"), value))
        }
    }

    fn request(
        &self,
        api: &Api,
        method: reqwest::Method,
        path: &str,
    ) -> Result<RequestBuilder, ProviderError> {
        let (name, value) = self.auth_header()?;
        Ok(api
            .client()
            .request(method, api.url(path))
            .header(name, value))
    }

    /// Asks `POST /estimate` (or `/estimate-gen`) what the job would take. Reads the
    /// input's size from its header (a URL input is fetched).
    pub async fn estimate(&self, api: &Api, spec: &JobSpec) -> Result<Estimate, ProviderError> {
        let plan = Plan::from_spec(spec).map_err(|e| ProviderError::permanent(e.join("; ")))?;
        let Some(estimate_path) = plan.endpoint.estimate_path() else {
            return Err(ProviderError::permanent(format!(
                "topaz documents no estimate for {}",
                plan.endpoint.operation()
            )));
        };
        let source = util::single_input(spec)?;
        let dims = if util::is_url(source) {
            util::load_input(api, source, MAX_INPUT_BYTES)
                .await?
                .dimensions()
        } else {
            let path = std::path::PathBuf::from(source);
            tokio::task::spawn_blocking(move || util::dimensions_of_file(&path))
                .await
                .map_err(|e| ProviderError::transient(format!("reading the input's size: {e}")))?
        };
        let (w, h) = dims.ok_or_else(|| {
            ProviderError::permanent(format!("cannot read the size of input {source}"))
        })?;
        let mut form = Form::new()
            .text("input_width", w.to_string())
            .text("input_height", h.to_string());
        for (name, value) in &plan.fields {
            form = form.text(name.clone(), value.clone());
        }
        let request = self
            .request(api, reqwest::Method::POST, estimate_path)?
            .multipart(form);
        let response = api.send(RequestKind::Query, request).await?;
        if !response.status().is_success() {
            return Err(self.error(RequestKind::Query, response).await);
        }
        let v: Value = Api::read_json(RequestKind::Query, response, MAX_SMALL_JSON).await?;
        parse_estimate(&v).ok_or_else(|| {
            ProviderError::bad_answer(
                RequestKind::Query,
                format!(
                    "estimate answer without a duration: {}",
                    excerpt(v.to_string().as_bytes())
                ),
            )
        })
    }

    /// A Topaz error answer, with a hint for credential problems.
    async fn error(&self, kind: RequestKind, response: reqwest::Response) -> ProviderError {
        let status = response.status();
        let mut e = util::http_error(kind, response).await;
        if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
            if let ProviderError::Permanent(reason) = &e {
                e = ProviderError::credential(format!("{reason} (check TOPAZ_API_KEY)"));
            }
        }
        e
    }
}

fn parse_estimate(v: &Value) -> Option<Estimate> {
    let num = |name: &str| -> Option<u64> {
        match v.get(name)? {
            Value::Number(n) => n
                .as_u64()
                .or_else(|| n.as_f64().filter(|x| *x >= 0.0).map(|x| x.round() as u64)),
            Value::String(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| *x >= 0.0)
                .map(|x| x.round() as u64),
            _ => None,
        }
    };
    Some(Estimate {
        duration_s: num("duration")?,
        credits: num("credits"),
    })
}

/// A field of a JSON object as text (strings as they are, numbers as their text).
fn field_str<'a>(v: &'a Value, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    match v.get(name)? {
        Value::String(s) if !s.trim().is_empty() => Some(std::borrow::Cow::Borrowed(s.trim())),
        Value::Number(n) => Some(std::borrow::Cow::Owned(n.to_string())),
        _ => None,
    }
}

/// Reads a status answer (`GET /status/{id}`). Unknown fields are ignored and the
/// status compared without regard to case. An unknown status is taken as still
/// running (a newer API may add intermediate states; the engine's deadline bounds it).
pub fn parse_status(v: &Value, remote_id: &str, fallback_ext: &str) -> Result<PollOutcome, String> {
    if !v.is_object() {
        return Err(format!(
            "status answer is not an object: {}",
            excerpt(v.to_string().as_bytes())
        ));
    }
    let Some(status) = field_str(v, "status") else {
        return Err(format!(
            "status answer without a status: {}",
            excerpt(v.to_string().as_bytes())
        ));
    };
    Ok(match status.to_ascii_lowercase().as_str() {
        "completed" | "complete" | "succeeded" | "success" | "done" => {
            let key = field_str(v, "process_id")
                .map_or_else(|| remote_id.to_string(), |s| s.into_owned());
            let ext = field_str(v, "output_format")
                .and_then(|f| ext_of_format(&f))
                .unwrap_or(fallback_ext)
                .to_string();
            PollOutcome::Succeeded(vec![PendingOutput::Provider { key, ext }])
        }
        "failed" | "failure" | "error" => {
            let reason = util::json_message(v)
                .unwrap_or_else(|| "Topaz reported the task as failed".to_string());
            PollOutcome::Failed {
                reason,
                permanent: true,
            }
        }
        "cancelled" | "canceled" => PollOutcome::Cancelled,
        "pending" | "processing" | "queued" | "running" => PollOutcome::Running { next_poll: None },
        other => {
            tracing::debug!(
                status = other,
                "topaz: unknown task status, taken as running"
            );
            PollOutcome::Running { next_poll: None }
        }
    })
}

/// One entry of the status list, as far as reconciliation needs it.
#[derive(Debug, serde::Deserialize)]
struct ListedStatus {
    #[serde(default, deserialize_with = "lenient_string")]
    process_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    filename: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    creation_time: Option<String>,
}

/// Any JSON value; a string is kept, a number kept as its text, the rest dropped, so
/// one odd entry does not make the whole list unreadable.
fn lenient_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v: Value = serde::Deserialize::deserialize(d)?;
    Ok(match v {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// The file name's stem: the last path component without its last extension.
fn file_stem(name: &str) -> &str {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    match base.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem,
        _ => base,
    }
}

/// Finds the submission sent with `submit_key` in a status list (the newest, should
/// there be several).
fn find_submission(list: &[ListedStatus], submit_key: &str) -> Option<String> {
    list.iter()
        .filter(|s| {
            s.filename
                .as_deref()
                .is_some_and(|f| file_stem(f) == submit_key)
        })
        .filter_map(|s| {
            let id = s.process_id.as_deref().filter(|id| !id.trim().is_empty())?;
            let created = s
                .creation_time
                .as_deref()
                .and_then(|t| t.parse::<f64>().ok())
                .unwrap_or(0.0);
            Some((created, id))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, id)| id.to_string())
}

#[async_trait]
impl Provider for Topaz {
    fn can_estimate(&self) -> bool {
        true
    }

    async fn estimate_cost(&self, api: &Api, spec: &JobSpec) -> Result<Option<f64>, ProviderError> {
        // Sharpen, denoise, restore and lighting have no estimate endpoint: unknown.
        if Endpoint::from_operation(&spec.operation).is_some_and(|e| e.estimate_path().is_none()) {
            return Ok(None);
        }
        Ok(self.estimate(api, spec).await?.credits.map(|c| c as f64))
    }

    /// `GET /account/v1/credits/balance` (the Account API, beside `/image/v1` on the
    /// same host): `available_credits` is what can be spent; reserved credits are
    /// held by tasks in progress.
    async fn balance(&self, api: &Api) -> Result<Option<Balance>, ProviderError> {
        let url = account_url(api.base_url(), "/credits/balance")?;
        let (name, value) = self.auth_header()?;
        let request = api
            .client()
            .request(reqwest::Method::GET, url)
            .header(name, value);
        let response = api.send(RequestKind::Query, request).await?;
        if !response.status().is_success() {
            return Err(self.error(RequestKind::Query, response).await);
        }
        let v: Value = Api::read_json(RequestKind::Query, response, MAX_SMALL_JSON).await?;
        parse_balance(&v).map(Some).ok_or_else(|| {
            ProviderError::bad_answer(
                RequestKind::Query,
                format!(
                    "credit balance answer without available_credits: {}",
                    excerpt(v.to_string().as_bytes())
                ),
            )
        })
    }

    /// `GET /status` lists the account's tasks: free, and it needs the key.
    async fn check_access(&self, api: &Api) -> Result<String, ProviderError> {
        // One status is enough; the whole list may be slow for a big account.
        let request = self.request(api, reqwest::Method::GET, "/status?paginated=true&limit=1")?;
        let response = api.send(RequestKind::Query, request).await?;
        if !response.status().is_success() {
            return Err(self.error(RequestKind::Query, response).await);
        }
        Ok(format!(
            "key accepted (GET /status answered HTTP {})",
            response.status()
        ))
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Topaz
    }

    async fn authenticate(&self, _api: &Api) -> Result<(), ProviderError> {
        // No auth round trip; only make sure the key can be sent at all.
        self.auth_header().map(|_| ())
    }

    async fn submit(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<SubmitOutcome, ProviderError> {
        let plan = Plan::from_spec(job.spec).map_err(|e| ProviderError::permanent(e.join("; ")))?;
        let source = util::single_input(job.spec)?;
        // A fresh form for every call: a sent body cannot be replayed.
        let mut form = Form::new();
        for (name, value) in &plan.fields {
            form = form.text(name.clone(), value.clone());
        }
        let form = if util::is_url(source) {
            // Topaz fetches an http(s) input itself (`source_url`): pixbatch neither
            // downloads nor re-uploads it. Its format and size are Topaz's to check;
            // a refusal is a 400 before any charge.
            form.text("source_url", source.to_string())
        } else {
            let input = util::load_input(api, source, MAX_INPUT_BYTES).await?;
            let problems = plan.check_input(input.format, input.dimensions());
            if !problems.is_empty() {
                return Err(ProviderError::permanent(problems.join("; ")));
            }
            let len = input.bytes.len() as u64;
            let image = Part::stream_with_length(reqwest::Body::from(input.bytes.clone()), len)
                .file_name(format!("{}.{}", job.submit_key, input.ext()))
                .mime_str(input.mime())
                .map_err(|e| ProviderError::permanent(format!("building the request: {e}")))?;
            form.part("image", image)
        };
        let request = self
            .request(api, reqwest::Method::POST, plan.endpoint.path())?
            .header("X-Request-Id", job.submit_key.as_str())
            .multipart(form);

        let response = api.send(RequestKind::Submit, request).await?;
        if !response.status().is_success() {
            return Err(self.error(RequestKind::Submit, response).await);
        }
        let header_id = util::header_str(&response, "x-process-id");

        if plan.endpoint.is_sync() {
            let content_type = util::header_str(&response, "content-type");
            let data = Api::read_bytes(RequestKind::Submit, response, MAX_SYNC_ANSWER).await?;
            return read_sync_answer(content_type.as_deref(), data, header_id);
        }

        let body = Api::read_bytes(RequestKind::Submit, response, MAX_SMALL_JSON).await?;
        read_accepted(&body, header_id)
    }

    async fn poll(
        &self,
        api: &Api,
        job: &JobContext<'_>,
        remote_id: &str,
    ) -> Result<PollOutcome, ProviderError> {
        let request = self.request(
            api,
            reqwest::Method::GET,
            &format!("/status/{}", path_segment(remote_id)),
        )?;
        let response = api.send(RequestKind::Poll, request).await?;
        if response.status() == StatusCode::NOT_FOUND {
            let detail = util::read_prefix(response, 4096).await;
            let msg = util::error_message(&detail).unwrap_or_else(|| "not found".into());
            return Ok(PollOutcome::Lost {
                reason: format!("topaz does not know task {remote_id}: {msg}"),
                charged: true,
            });
        }
        if !response.status().is_success() {
            return Err(self.error(RequestKind::Poll, response).await);
        }
        let status = response.status();
        let body = Api::read_bytes(RequestKind::Poll, response, MAX_SMALL_JSON).await?;
        let fallback_ext = Plan::from_spec(job.spec).map_or("jpg", |p| p.ext);
        read_status(status, &body, remote_id, fallback_ext)
    }

    async fn output_url(
        &self,
        api: &Api,
        remote_id: &str,
        key: &str,
    ) -> Result<String, ProviderError> {
        let id = if key.is_empty() { remote_id } else { key };
        let request = self.request(
            api,
            reqwest::Method::GET,
            &format!("/download/{}", path_segment(id)),
        )?;
        let response = api.send(RequestKind::Link, request).await?;
        match response.status() {
            s if s.is_success() => {}
            StatusCode::CONFLICT => {
                let detail = util::read_prefix(response, 4096).await;
                let msg = util::error_message(&detail).unwrap_or_else(|| "not ready".into());
                return Err(ProviderError::transient(format!(
                    "topaz result {id} not ready for download: {msg}"
                )));
            }
            StatusCode::NOT_FOUND => {
                // Links can be made for 24 hours after processing; after that the
                // result is gone and only a new task can produce it.
                let detail = util::read_prefix(response, 4096).await;
                let msg = util::error_message(&detail).unwrap_or_else(|| "not found".into());
                return Err(ProviderError::Lost(format!(
                    "topaz result {id} is no longer available: {msg}"
                )));
            }
            _ => return Err(self.error(RequestKind::Link, response).await),
        }
        let status = response.status();
        let body = Api::read_bytes(RequestKind::Link, response, MAX_SMALL_JSON).await?;
        read_download(status, &body)
    }

    async fn reconcile(
        &self,
        api: &Api,
        job: &JobContext<'_>,
    ) -> Result<Reconciliation, ProviderError> {
        // A `source_url` submission has no file name of ours to find in the list
        // (Topaz names it after the URL): whether it arrived cannot be told.
        if util::single_input(job.spec).is_ok_and(util::is_url) {
            return Ok(Reconciliation::Unknowable);
        }
        // The paginated list (`paginated=true`, `limit`, `cursor`): the plain array
        // of every status "may be slow or fail for accounts with many statuses".
        let mut cursor: Option<String> = None;
        let mut found: Vec<ListedStatus> = Vec::new();
        for _ in 0..MAX_STATUS_PAGES {
            let path = {
                let mut query = url::form_urlencoded::Serializer::new(String::new());
                query
                    .append_pair("paginated", "true")
                    .append_pair("limit", &self.status_page.to_string());
                if let Some(c) = &cursor {
                    query.append_pair("cursor", c);
                }
                format!("/status?{}", query.finish())
            };
            let request = self.request(api, reqwest::Method::GET, &path)?;
            let response = api.send(RequestKind::Query, request).await?;
            if !response.status().is_success() {
                return Err(self.error(RequestKind::Query, response).await);
            }
            let Some(body) =
                util::read_limited(RequestKind::Query, response, MAX_JSON_ANSWER).await?
            else {
                tracing::warn!(
                    "topaz: a status list page is longer than {} and cannot be searched; the submission cannot be reconciled",
                    util::human_bytes(MAX_JSON_ANSWER)
                );
                return Ok(Reconciliation::Unknowable);
            };
            let page = read_status_page(&body)?;
            let key = job.submit_key.as_str();
            found.extend(
                page.statuses
                    .into_iter()
                    .filter(|st| st.filename.as_deref().is_some_and(|f| file_stem(f) == key)),
            );
            match page.next_cursor {
                Some(next) if cursor.as_deref() != Some(next.as_str()) => cursor = Some(next),
                // The last page (or a server that ignored `paginated` and sent the
                // whole array, or repeats its cursor): the list has been read.
                _ => {
                    return Ok(match find_submission(&found, key) {
                        Some(remote_id) => Reconciliation::Found { remote_id },
                        None => Reconciliation::NotSubmitted,
                    })
                }
            }
        }
        tracing::warn!(
            "topaz: the status list has more than {MAX_STATUS_PAGES} pages; the submission cannot be reconciled"
        );
        Ok(Reconciliation::Unknowable)
    }

    async fn cancel(&self, api: &Api, remote_id: &str) -> Result<bool, ProviderError> {
        let request = self.request(
            api,
            reqwest::Method::DELETE,
            &format!("/cancel/{}", path_segment(remote_id)),
        )?;
        let response = api.send(RequestKind::Cleanup, request).await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            // Not in a cancellable state (already finished, failed or cancelled), or
            // unknown: nothing to cancel.
            StatusCode::CONFLICT | StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.error(RequestKind::Cleanup, response).await),
        }
    }

    async fn cleanup(&self, api: &Api, remote_id: &str) -> Result<(), ProviderError> {
        let request = self.request(
            api,
            reqwest::Method::DELETE,
            &format!("/status/{}", path_segment(remote_id)),
        )?;
        let response = api.send(RequestKind::Cleanup, request).await?;
        match response.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.error(RequestKind::Cleanup, response).await),
        }
    }
}

/// A process id as one URL path segment (ids are UUIDs; anything else is escaped).
fn path_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.trim().as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// Reads the answer of a synchronous `POST /enhance`: the body is the image. An answer
/// that is not an image leaves the outcome of the paid request unknown
/// (reconciliation asks the status list).
pub fn read_sync_answer(
    content_type: Option<&str>,
    data: bytes::Bytes,
    header_id: Option<String>,
) -> Result<SubmitOutcome, ProviderError> {
    let Some(format) = ImageFormat::sniff(&data) else {
        return Err(ProviderError::bad_answer(
            RequestKind::Submit,
            format!(
                "the synchronous answer is not an image ({}): {}",
                content_type.unwrap_or("no content type"),
                excerpt(&data)
            ),
        ));
    };
    Ok(SubmitOutcome::Finished {
        remote_id: header_id,
        outputs: vec![OutputData::Bytes {
            data,
            ext: format.ext().to_string(),
        }],
    })
}

/// Reads the answer of an accepted async submission: `process_id` in the body, else
/// in the `X-Process-ID` header.
pub fn read_accepted(
    body: &[u8],
    header_id: Option<String>,
) -> Result<SubmitOutcome, ProviderError> {
    let from_json = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| field_str(&v, "process_id").map(|s| s.into_owned()));
    match from_json.or(header_id) {
        Some(remote_id) => Ok(SubmitOutcome::Accepted {
            remote_id,
            first_poll_after: None,
        }),
        None => Err(ProviderError::bad_answer(
            RequestKind::Submit,
            format!("accepted without a process_id: {}", excerpt(body)),
        )),
    }
}

/// Reads a status answer's body ([`parse_status`]).
pub fn read_status(
    status: StatusCode,
    body: &[u8],
    remote_id: &str,
    fallback_ext: &str,
) -> Result<PollOutcome, ProviderError> {
    let v = util::parse_json(RequestKind::Poll, status, body)?;
    parse_status(&v, remote_id, fallback_ext)
        .map_err(|e| ProviderError::bad_answer(RequestKind::Poll, e))
}

/// Reads a download answer's body ([`parse_download`]).
pub fn read_download(status: StatusCode, body: &[u8]) -> Result<String, ProviderError> {
    let v = util::parse_json(RequestKind::Link, status, body)?;
    parse_download(&v).map_err(|e| ProviderError::bad_answer(RequestKind::Link, e))
}

/// Reads the status list (`GET /status`) and looks for the submission sent with
/// `submit_key`.
pub fn read_status_list(body: &[u8], submit_key: &str) -> Result<Reconciliation, ProviderError> {
    let list: Vec<ListedStatus> = serde_json::from_slice(body).map_err(|e| {
        ProviderError::bad_answer(
            RequestKind::Query,
            format!("unexpected status list: {e}: {}", excerpt(body)),
        )
    })?;
    Ok(match find_submission(&list, submit_key) {
        Some(remote_id) => Reconciliation::Found { remote_id },
        None => Reconciliation::NotSubmitted,
    })
}

/// The Account API's URL for `path`, from the Image API's base: `…/image/v1` becomes
/// `…/account/v1` (the two share the host, in production and in the simulator).
pub fn account_url(image_base: &str, path: &str) -> Result<String, ProviderError> {
    let base = image_base.trim_end_matches('/');
    match base.strip_suffix("/image/v1") {
        Some(host) => Ok(format!("{host}/account/v1{path}")),
        None => Err(ProviderError::permanent(format!(
            "cannot find Topaz's Account API from the base URL {base} (it should end in /image/v1)"
        ))),
    }
}

/// `available_credits` (integer in the reference; a number is accepted).
pub fn parse_balance(v: &Value) -> Option<Balance> {
    let amount = match v.get("available_credits")? {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    amount.is_finite().then(|| Balance {
        amount,
        unit: "credits".into(),
    })
}

/// One page of `GET /status?paginated=true`.
#[derive(Debug, Default)]
pub struct StatusPage {
    statuses: Vec<ListedStatus>,
    /// The cursor of the next page; `None` on the last one.
    next_cursor: Option<String>,
}

/// Reads a status list page leniently: the reference names the metadata
/// (`next_cursor`, `has_next_page`) but not the array's key, so the first array
/// among `statuses`, `data`, `items`, `results` (then any array field) holds the
/// statuses. A plain array (a server ignoring `paginated`) is the whole list.
pub fn read_status_page(body: &[u8]) -> Result<StatusPage, ProviderError> {
    let bad = |why: String| {
        ProviderError::bad_answer(
            RequestKind::Query,
            format!("unexpected status list: {why}: {}", excerpt(body)),
        )
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let parse = |items: &Value| -> Result<Vec<ListedStatus>, ProviderError> {
        serde_json::from_value(items.clone()).map_err(|e| bad(e.to_string()))
    };
    match &v {
        Value::Array(_) => Ok(StatusPage {
            statuses: parse(&v)?,
            next_cursor: None,
        }),
        Value::Object(m) => {
            let items = ["statuses", "data", "items", "results"]
                .iter()
                .find_map(|k| m.get(*k).filter(|x| x.is_array()))
                .or_else(|| m.values().find(|x| x.is_array()));
            let statuses = match items {
                Some(items) => parse(items)?,
                None => Vec::new(),
            };
            let more = m.get("has_next_page").and_then(Value::as_bool);
            let next_cursor = m
                .get("next_cursor")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty() && more != Some(false))
                .map(str::to_string);
            Ok(StatusPage {
                statuses,
                next_cursor,
            })
        }
        _ => Err(bad("neither an array nor an object".into())),
    }
}

/// Reads a download answer: `download_url`.
pub fn parse_download(v: &Value) -> Result<String, String> {
    match v.get("download_url") {
        Some(Value::String(u)) if util::is_url(u.trim()) => Ok(u.trim().to_string()),
        _ => Err(format!(
            "download answer without a download_url: {}",
            excerpt(v.to_string().as_bytes())
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(operation: &str, inputs: &[&str], prompt: Option<&str>, params: Value) -> JobSpec {
        JobSpec {
            id: "job1".into(),
            provider: ProviderKind::Topaz,
            operation: operation.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    fn url_spec(operation: &str, params: Value) -> JobSpec {
        spec(operation, &["https://example.com/a.png"], None, params)
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 100, 50]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    fn one_error(spec: &JobSpec, needle: &str) {
        let errors = validate(spec);
        assert!(
            errors.iter().any(|e| e.contains(needle)),
            "expected an error containing {needle:?}, got {errors:?}"
        );
    }

    /// The row passes, with a warning containing `needle`.
    fn one_warning(spec: &JobSpec, needle: &str) {
        let found = check(spec);
        assert!(
            found.errors.is_empty(),
            "unexpected errors {:?}",
            found.errors
        );
        assert!(
            found.warnings.iter().any(|e| e.contains(needle)),
            "expected a warning containing {needle:?}, got {:?}",
            found.warnings
        );
    }

    #[test]
    fn a_plain_job_is_valid_with_defaults() {
        assert_eq!(
            validate(&url_spec("enhance", json!({}))),
            Vec::<String>::new()
        );
        let plan = Plan::from_spec(&url_spec("enhance", json!({}))).expect("plan");
        assert_eq!(plan.model, "Standard V2");
        assert_eq!(plan.ext, "jpg");
        assert!(plan
            .fields
            .contains(&("output_format".into(), "jpeg".into())));
        let plan = Plan::from_spec(&url_spec("enhance-gen", json!({}))).expect("plan");
        assert_eq!(plan.model, "Redefine");
        assert_eq!(plan.endpoint, Endpoint::EnhanceGen);
        let plan = Plan::from_spec(&url_spec("ENHANCE_SYNC", json!({"output_format": "TIF"})))
            .expect("plan");
        assert_eq!((plan.endpoint, plan.ext), (Endpoint::EnhanceSync, "tiff"));
    }

    #[test]
    fn every_documented_limit_is_checked() {
        one_error(
            &url_spec("enhance-gen", json!({"creativity": 10})),
            "creativity must be an integer from 1 to 9 (got 10)",
        );
        one_error(
            &url_spec(
                "enhance-gen",
                json!({"model": "Bloom Realism", "creativity": 5}),
            ),
            "creativity must be an integer from 1 to 4 (got 5)",
        );
        one_error(
            &url_spec("enhance", json!({"strength": 0})),
            "strength must be a number from 0.01 to 1",
        );
        one_error(
            &url_spec("enhance", json!({"subject_detection": "sky"})),
            "subject_detection must be one of",
        );
        one_error(
            &url_spec("enhance", json!({"face_enhancement": true})),
            "needs face_enhancement_strength",
        );
        one_error(
            &url_spec("enhance-gen", json!({"model": "Recovery V2", "detail": 2})),
            "detail must be a number from 0 to 1",
        );
        one_error(
            &url_spec("enhance-gen", json!({"texture": 0})),
            "texture must be an integer from 1 to 5 (got 0)",
        );
        one_error(
            &url_spec("enhance-gen", json!({"creativity": "2.5"})),
            "not an integer",
        );
        one_error(
            &url_spec("enhance", json!({"output_width": 32001})),
            "output_width must be an integer from 1 to 32000 (got 32001)",
        );
        one_error(
            &url_spec("enhance", json!({"output_height": 0})),
            "output_height must be an integer from 1 to 32000",
        );
        one_error(
            &url_spec("enhance", json!({"denoise": 1.2})),
            "denoise must be a number from 0 to 1 (got 1.2)",
        );
        one_error(
            &url_spec("enhance", json!({"face_enhancement_creativity": -0.1})),
            "face_enhancement_creativity",
        );
        one_error(
            &url_spec("enhance", json!({"output_format": "webp"})),
            "output_format must be one of",
        );
        one_error(
            &url_spec("enhance", json!({"crop_to_fill": "perhaps"})),
            "crop_to_fill must be true or false",
        );
        one_error(
            &url_spec("enhance-gen", json!({"prompt": "x".repeat(1025)})),
            "at most 1024",
        );
        one_error(
            &url_spec("enhance", json!({"options_json": "not json"})),
            "options_json must be a JSON object",
        );
        // Numbers given as strings are fine.
        assert!(validate(&url_spec(
            "enhance-gen",
            json!({"creativity": "3", "denoise": "0.5"})
        ))
        .is_empty());
        assert!(validate(&url_spec("enhance", json!({"options_json": {"a": 1}}))).is_empty());
        assert!(validate(&url_spec("enhance", json!({"options_json": "{\"a\":1}"}))).is_empty());
    }

    #[test]
    fn filter_operations_check_their_models_and_settings() {
        for (op, params, path) in [
            (
                "sharpen",
                json!({"model": "Lens Blur V2", "strength": 0.5, "minor_denoise": 0.2}),
                "/sharpen/async",
            ),
            ("sharpen-sync", json!({}), "/sharpen"),
            (
                "sharpen-gen",
                json!({"model": "Super Focus V2", "detail": 0.4, "focus_boost": 0.5}),
                "/sharpen-gen/async",
            ),
            (
                "denoise",
                json!({"model": "Extreme", "strength": 0.6, "original_detail": 0}),
                "/denoise/async",
            ),
            ("denoise-sync", json!({"minor_deblur": 0.1}), "/denoise"),
            ("restore", json!({}), "/restore-gen/async"),
            (
                "lighting",
                json!({"model": "Adjust", "exposure": 1.5, "color_correction": true}),
                "/lighting/async",
            ),
            (
                "lighting-sync",
                json!({"model": "White Balance", "temperature": 0.3}),
                "/lighting",
            ),
        ] {
            let found = check(&url_spec(op, params.clone()));
            assert_eq!(
                found,
                crate::providers::Findings::default(),
                "{op} {params}"
            );
            let plan = Plan::from_spec(&url_spec(op, params)).expect("plan");
            assert_eq!(plan.endpoint.path(), path);
        }
        one_error(
            &url_spec("sharpen", json!({"strength": 0})),
            "strength must be a number from 0.01 to 1",
        );
        one_error(
            &url_spec("sharpen-gen", json!({"focus_boost": 0.1})),
            "focus_boost must be a number from 0.25 to 1",
        );
        one_error(
            &url_spec("lighting", json!({"exposure": 2.5})),
            "exposure must be a number from 0 to 2",
        );
        one_warning(
            &url_spec("sharpen", json!({"model": "Strong", "minor_denoise": 0.3})),
            "does not use parameter minor_denoise",
        );
        one_warning(
            &url_spec("restore", json!({"model": "Colorize"})),
            "not one pixbatch knows for restore-gen",
        );
        one_warning(
            &url_spec("denoise", json!({"output_width": 100})),
            "\"output_width\" is not one pixbatch knows for denoise",
        );
        assert_eq!(
            Plan::from_spec(&url_spec("sharpen-gen", json!({})))
                .expect("plan")
                .model,
            "Super Focus V2"
        );
        assert_eq!(requests_per_job(&url_spec("lighting-sync", json!({}))), 2);
        assert_eq!(requests_per_job(&url_spec("restore", json!({}))), 8);
    }

    #[test]
    fn current_models_and_settings_are_accepted() {
        for (op, params) in [
            (
                "enhance-gen",
                json!({"model": "Recovery V2", "detail": 0.5}),
            ),
            (
                "enhance-gen",
                json!({"model": "Standard MAX", "creativity": 9, "subject_detection": "foreground"}),
            ),
            (
                "enhance-gen",
                json!({"model": "Wonder", "autoprompt": true, "face_enhancement": true,
                       "face_enhancement_strength": 0.8, "face_enhancement_creativity": 0.2}),
            ),
            (
                "enhance-gen",
                json!({"model": "wonder 3.5", "detail": true}),
            ),
            (
                "enhance-gen",
                json!({"model": "Bloom Realism", "creativity": 4}),
            ),
            ("enhance", json!({"model": "Text Refine", "strength": 0.4})),
            ("enhance", json!({"model": "Upscale High Fidelity V3"})),
        ] {
            let found = check(&url_spec(op, params.clone()));
            assert_eq!(
                found,
                crate::providers::Findings::default(),
                "{op} {params}"
            );
        }
        let plan = Plan::from_spec(&url_spec("enhance-gen", json!({"model": "wonder 3.5"})))
            .expect("plan");
        assert_eq!(plan.model, "Wonder 3.5");
    }

    #[test]
    fn models_are_checked_per_endpoint() {
        one_warning(
            &url_spec("enhance", json!({"model": "Redefine"})),
            "\"Redefine\" is a model of operation enhance-gen",
        );
        one_warning(
            &url_spec("enhance-gen", json!({"model": "Standard V2"})),
            "for enhance-gen",
        );
        one_warning(
            &url_spec("enhance-sync", json!({"model": "Recovery"})),
            "for enhance-sync",
        );
        one_warning(
            &url_spec("enhance-gen", json!({"model": "Wonder 9"})),
            "not one pixbatch knows",
        );
        // Sent as written.
        let plan = Plan::from_spec(&url_spec("enhance-gen", json!({"model": " Wonder 9 "})))
            .expect("plan");
        assert_eq!(plan.model, "Wonder 9");
        assert!(plan.fields.contains(&("model".into(), "Wonder 9".into())));
        one_error(&url_spec("enhance", json!({"model": 3})), "model must be");
        // strict_params turns warnings into errors.
        let strict = check(&url_spec("enhance-gen", json!({"model": "Wonder 9"})))
            .strict(ProviderKind::Topaz);
        assert!(strict.warnings.is_empty());
        assert!(
            strict
                .errors
                .iter()
                .any(|e| e.contains("strict_params = true")),
            "{strict:?}"
        );
        assert!(validate(&url_spec("enhance", json!({"model": "low resolution v2"}))).is_empty());
        assert!(validate(&url_spec("enhance-gen", json!({"model": "Recovery"}))).is_empty());
        // Settings the model would silently ignore.
        one_warning(
            &url_spec("enhance", json!({"creativity": 3})),
            "does not use parameter creativity",
        );
        one_warning(
            &url_spec("enhance", json!({"model": "CGI", "fix_compression": 0.2})),
            "does not use parameter fix_compression",
        );
        one_warning(
            &url_spec("enhance-gen", json!({"model": "Recovery", "denoise": 0.2})),
            "it takes detail",
        );
        one_warning(
            &spec("enhance", &["https://x/a.png"], Some("a cat"), json!({})),
            "prompt column",
        );
    }

    #[test]
    fn unknown_operations_are_refused_and_unknown_params_warn() {
        one_error(&url_spec("upscale", json!({})), "unknown topaz operation");
        one_warning(
            &url_spec("enhance", json!({"ouput_width": 100})),
            "did you mean \"output_width\"",
        );
        one_warning(
            &url_spec("enhance-gen", json!({"grain_model": "silver"})),
            "\"grain_model\" is not one pixbatch knows",
        );
        let plan = Plan::from_spec(&url_spec("enhance-gen", json!({"seed": 7}))).expect("plan");
        assert!(plan.fields.contains(&("seed".into(), "7".into())));
        one_error(
            &url_spec("enhance-gen", json!({"seed": [1]})),
            "form fields are text",
        );
        one_error(&spec("enhance", &[], None, json!({})), "needs one input");
        one_error(
            &spec(
                "enhance",
                &["https://x/a.png", "https://x/b.png"],
                None,
                json!({}),
            ),
            "exactly one input",
        );
    }

    #[test]
    fn the_prompt_column_becomes_the_prompt_field() {
        let s = spec(
            "enhance-gen",
            &["https://x/a.png"],
            Some("girl with red hair"),
            json!({"prompt": "other"}),
        );
        let plan = Plan::from_spec(&s).expect("plan");
        assert!(plan
            .fields
            .contains(&("prompt".into(), "girl with red hair".into())));
        let s = spec(
            "enhance-gen",
            &["https://x/a.png"],
            None,
            json!({"prompt": "from params"}),
        );
        assert!(Plan::from_spec(&s)
            .expect("plan")
            .fields
            .contains(&("prompt".into(), "from params".into())));
    }

    #[test]
    fn megapixel_limits_use_the_local_inputs_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("in.png");
        std::fs::write(&path, png(1000, 500)).expect("write");
        let p = path.to_str().expect("utf8");
        // Sync: 96 MP. 20000 wide scales the height to 10000: 200 MP.
        one_error(
            &spec("enhance-sync", &[p], None, json!({"output_width": 20000})),
            "at most 96 megapixels",
        );
        assert!(validate(&spec(
            "enhance-sync",
            &[p],
            None,
            json!({"output_width": 12000})
        ))
        .is_empty());
        // Async: 512 MP.
        assert!(validate(&spec("enhance", &[p], None, json!({"output_width": 30000}))).is_empty());
        one_error(
            &spec(
                "enhance",
                &[p],
                None,
                json!({"output_width": 32000, "output_height": 32000}),
            ),
            "at most 512 megapixels",
        );
        // Gen: 256 MP.
        one_error(
            &spec("enhance-gen", &[p], None, json!({"output_width": 30000})),
            "at most 256 megapixels",
        );
        // The proportional side beyond 32000.
        one_error(
            &spec("enhance", &[p], None, json!({"output_height": 20000})),
            "32000 pixels a side",
        );
        // No output size: the provider decides.
        assert!(validate(&spec("enhance-sync", &[p], None, json!({}))).is_empty());
        // Recovery input ≤ 16 MP (checked on the plan: a 17 MP PNG is slow to make).
        let plan =
            Plan::from_spec(&url_spec("enhance-gen", json!({"model": "Recovery"}))).expect("plan");
        let errs = plan.check_input(Some(ImageFormat::Png), Some((5000, 3400)));
        assert!(
            errs.iter().any(|e| e.contains("at most 16 megapixels")),
            "{errs:?}"
        );
        assert!(plan
            .check_input(Some(ImageFormat::Png), Some((4000, 4000)))
            .is_empty());
        // Formats.
        let errs = plan.check_input(Some(ImageFormat::Webp), None);
        assert!(errs[0].contains("not WebP"), "{errs:?}");
        let gif = dir.path().join("in.gif");
        std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").expect("write");
        one_error(
            &spec("enhance", &[gif.to_str().expect("utf8")], None, json!({})),
            "JPEG, PNG or TIFF",
        );
        one_error(
            &spec("enhance", &["/no/such/file.png"], None, json!({})),
            "does not exist",
        );
    }

    #[test]
    fn status_answers_are_read_leniently() {
        let v = json!({"process_id": "p1", "status": "Processing", "progress": 40, "new_field": {"x": 1}});
        assert!(matches!(
            parse_status(&v, "p1", "jpg"),
            Ok(PollOutcome::Running { next_poll: None })
        ));
        let v = json!({"process_id": "p1", "status": "pending"});
        assert!(matches!(
            parse_status(&v, "p1", "jpg"),
            Ok(PollOutcome::Running { .. })
        ));
        let v = json!({"process_id": "p1", "status": "Completed", "output_format": "png", "credits": 2, "extra": [1]});
        match parse_status(&v, "p1", "jpg") {
            Ok(PollOutcome::Succeeded(outs)) => {
                assert_eq!(
                    outs,
                    vec![PendingOutput::Provider {
                        key: "p1".into(),
                        ext: "png".into()
                    }]
                )
            }
            other => panic!("{other:?}"),
        }
        let v = json!({"status": "COMPLETED"});
        match parse_status(&v, "p9", "tiff") {
            Ok(PollOutcome::Succeeded(outs)) => {
                assert_eq!(
                    outs,
                    vec![PendingOutput::Provider {
                        key: "p9".into(),
                        ext: "tiff".into()
                    }]
                )
            }
            other => panic!("{other:?}"),
        }
        let v = json!({"status": "Failed", "message": "Image could not be processed"});
        match parse_status(&v, "p1", "jpg") {
            Ok(PollOutcome::Failed { reason, permanent }) => {
                assert!(permanent);
                assert_eq!(reason, "Image could not be processed");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_status(&json!({"status": "Failed"}), "p", "jpg"),
            Ok(PollOutcome::Failed { .. })
        ));
        assert!(matches!(
            parse_status(&json!({"status": "Cancelled"}), "p", "jpg"),
            Ok(PollOutcome::Cancelled)
        ));
        assert!(parse_status(&json!({"progress": 3}), "p", "jpg").is_err());
        assert!(parse_status(&json!([1, 2]), "p", "jpg").is_err());
        assert!(parse_status(&json!({"status": 7}), "p", "jpg").is_ok());
    }

    #[test]
    fn download_and_estimate_answers() {
        let v =
            json!({"download_url": "https://s3/x?sig=1", "head_url": "https://s3/h", "expiry": 1});
        assert_eq!(parse_download(&v), Ok("https://s3/x?sig=1".into()));
        assert!(parse_download(&json!({"url": "https://s3/x"})).is_err());
        assert!(parse_download(&json!({"download_url": 5})).is_err());
        assert_eq!(
            parse_estimate(&json!({"duration": 30, "credits": 2})),
            Some(Estimate {
                duration_s: 30,
                credits: Some(2)
            })
        );
        assert_eq!(
            parse_estimate(&json!({"duration": 12.6})),
            Some(Estimate {
                duration_s: 13,
                credits: None
            })
        );
        assert_eq!(parse_estimate(&json!({"credits": 2})), None);
        assert_eq!(parse_estimate(&json!("garbage")), None);
    }

    #[test]
    fn reconciliation_matches_the_file_name_stem() {
        let list: Vec<ListedStatus> = serde_json::from_value(json!([
            {"process_id": "a", "filename": "other~1.png", "status": "Completed"},
            {"process_id": "b", "filename": "job.1~2.jpg", "creation_time": 5},
            {"process_id": "c", "filename": "job.1~2.jpg", "creation_time": 9},
            {"process_id": "d", "filename": "job.1~20.jpg"},
            {"process_id": null, "filename": 3},
            {"filename": "job.1~3.tiff"}
        ]))
        .expect("list");
        assert_eq!(find_submission(&list, "job.1~2").as_deref(), Some("c"));
        assert_eq!(find_submission(&list, "other~1").as_deref(), Some("a"));
        assert_eq!(find_submission(&list, "job.1~3"), None);
        assert_eq!(find_submission(&list, "nope~1"), None);
        assert_eq!(file_stem("dir/x~1.png"), "x~1");
        assert_eq!(file_stem("x~1"), "x~1");
    }

    #[test]
    fn legacy_keys_go_as_bearer() {
        let t = Topaz::new(format!("{LEGACY_KEY_PREFIX}rest"));
        let (name, value) = t.auth_header().expect("header");
        assert_eq!(name, AUTHORIZATION);
        assert!(value.to_str().expect("ascii").starts_with("Bearer eyJ"));
        assert!(value.is_sensitive());
        let (name, _) = Topaz::new("abc".into()).auth_header().expect("header");
        assert_eq!(name.as_str(), "x-api-key");
        assert!(Topaz::new("bad\nkey".into()).auth_header().is_err());
        assert!(!format!("{:?}", Topaz::new("secret".into())).contains("secret"));
    }

    #[test]
    fn requests_per_job_by_endpoint() {
        assert_eq!(requests_per_job(&url_spec("enhance-sync", json!({}))), 2);
        assert!(requests_per_job(&url_spec("enhance", json!({}))) >= 3);
    }
}

/// The adapter against a small local server speaking Topaz's HTTP.
#[cfg(test)]
mod http_tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Multipart, Path, State};
    use axum::http::{HeaderMap, StatusCode as Code};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{delete, get, post};
    use axum::{Json, Router};
    use serde_json::json;

    use super::*;
    use crate::api::OpenGate;

    #[derive(Default, Debug, Clone)]
    struct Seen {
        api_key: Option<String>,
        request_id: Option<String>,
        file_name: Option<String>,
        content_type: Option<String>,
        fields: Vec<(String, String)>,
        image_len: usize,
        polls: u32,
        deleted: Vec<String>,
    }

    type Shared = Arc<Mutex<Seen>>;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 100, 50]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    async fn record(state: &Shared, headers: &HeaderMap, mut form: Multipart) {
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        {
            let mut seen = state.lock().expect("lock");
            seen.api_key = header("x-api-key").or_else(|| header("authorization"));
            seen.request_id = header("x-request-id");
        }
        while let Ok(Some(field)) = form.next_field().await {
            let name = field.name().unwrap_or("").to_string();
            if name == "image" {
                let file_name = field.file_name().map(str::to_string);
                let content_type = field.content_type().map(str::to_string);
                let len = field.bytes().await.map(|b| b.len()).unwrap_or(0);
                let mut seen = state.lock().expect("lock");
                seen.file_name = file_name;
                seen.content_type = content_type;
                seen.image_len = len;
            } else {
                let value = field.text().await.unwrap_or_default();
                state.lock().expect("lock").fields.push((name, value));
            }
        }
    }

    async fn enhance_async(
        State(s): State<Shared>,
        headers: HeaderMap,
        form: Multipart,
    ) -> Response {
        record(&s, &headers, form).await;
        (
            [("X-Process-Id", "pid-1")],
            Json(json!({"process_id": "pid-1", "eta": 1_700_000_000})),
        )
            .into_response()
    }

    async fn enhance_sync(
        State(s): State<Shared>,
        headers: HeaderMap,
        form: Multipart,
    ) -> Response {
        record(&s, &headers, form).await;
        (
            [("X-Process-Id", "pid-sync"), ("Content-Type", "image/png")],
            png(8, 6),
        )
            .into_response()
    }

    async fn enhance_gen(State(s): State<Shared>, headers: HeaderMap, form: Multipart) -> Response {
        record(&s, &headers, form).await;
        (
            Code::PAYMENT_REQUIRED,
            Json(json!({"code": 402, "message": "Insufficient funds."})),
        )
            .into_response()
    }

    async fn status(State(s): State<Shared>, Path(id): Path<String>) -> Response {
        match id.as_str() {
            "pid-1" => {
                let polls = {
                    let mut seen = s.lock().expect("lock");
                    seen.polls += 1;
                    seen.polls
                };
                let status = if polls < 2 { "Processing" } else { "Completed" };
                Json(json!({"process_id": "pid-1", "status": status, "progress": 50, "output_format": "png",
                    "brand_new_field": [1, 2, 3]}))
                .into_response()
            }
            "garbage" => "<html>oops</html>".into_response(),
            _ => (Code::NOT_FOUND, Json(json!({"code": 404, "message": "An image with the given process ID was not found."})))
                .into_response(),
        }
    }

    async fn status_list() -> Response {
        Json(json!([
            {"process_id": "pid-0", "filename": "other~1.png", "status": "Completed"},
            {"process_id": "pid-1", "filename": "job1~1.png", "status": "Processing", "creation_time": 1}
        ]))
        .into_response()
    }

    async fn download(Path(id): Path<String>) -> Response {
        match id.as_str() {
            "pid-1" => Json(json!({"download_url": "https://files.example/pid-1.png?sig=x", "head_url": "h", "expiry": 1}))
                .into_response(),
            "early" => (Code::CONFLICT, Json(json!({"code": 409, "message": "not ready"}))).into_response(),
            _ => (Code::NOT_FOUND, Json(json!({"code": 404, "message": "gone"}))).into_response(),
        }
    }

    async fn cancel(Path(id): Path<String>) -> Response {
        match id.as_str() {
            "pid-1" => Code::NO_CONTENT.into_response(),
            _ => (
                Code::CONFLICT,
                Json(json!({"code": 409, "message": "not cancellable"})),
            )
                .into_response(),
        }
    }

    async fn delete_status(State(s): State<Shared>, Path(id): Path<String>) -> Response {
        s.lock().expect("lock").deleted.push(id);
        Code::NO_CONTENT.into_response()
    }

    async fn estimate(State(s): State<Shared>, headers: HeaderMap, form: Multipart) -> Response {
        record(&s, &headers, form).await;
        Json(json!({"duration": 30, "credits": 2})).into_response()
    }

    async fn server() -> (Api, Shared) {
        let state: Shared = Arc::default();
        let routes = Router::new()
            .route("/enhance/async", post(enhance_async))
            .route("/enhance", post(enhance_sync))
            .route("/enhance-gen/async", post(enhance_gen))
            .route("/status", get(status_list))
            .route("/status/{id}", get(status).delete(delete_status))
            .route("/download/{id}", get(download))
            .route("/cancel/{id}", delete(cancel))
            .route("/estimate", post(estimate))
            .with_state(state.clone());
        let app = Router::new().nest("/topaz/image/v1", routes);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let api = Api::new(
            &format!("http://{addr}/topaz/image/v1"),
            reqwest::Client::new(),
            Arc::new(OpenGate),
        );
        (api, state)
    }

    fn job_spec(dir: &std::path::Path, operation: &str, params: Value) -> JobSpec {
        let path = dir.join("input.png");
        std::fs::write(&path, png(40, 30)).expect("write");
        JobSpec {
            id: "job1".into(),
            provider: ProviderKind::Topaz,
            operation: operation.into(),
            inputs: vec![path.to_string_lossy().into_owned()],
            prompt: None,
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    #[tokio::test]
    async fn async_enhance_submits_polls_links_and_cleans_up() {
        let (api, seen) = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = job_spec(
            dir.path(),
            "enhance",
            json!({"output_width": 80, "denoise": "0.3", "output_format": "png"}),
        );
        let job = JobContext {
            spec: &spec,
            submit_key: "job1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let topaz = Topaz::new("key-123".into());

        let outcome = topaz.submit(&api, &job).await.expect("submit");
        assert!(
            matches!(&outcome, SubmitOutcome::Accepted { remote_id, first_poll_after: None } if remote_id == "pid-1")
        );
        {
            let seen = seen.lock().expect("lock").clone();
            assert_eq!(seen.api_key.as_deref(), Some("key-123"));
            assert_eq!(seen.request_id.as_deref(), Some("job1~1"));
            assert_eq!(seen.file_name.as_deref(), Some("job1~1.png"));
            assert_eq!(seen.content_type.as_deref(), Some("image/png"));
            assert!(seen.image_len > 0);
            let field = |n: &str| {
                seen.fields
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.clone())
            };
            assert_eq!(field("model").as_deref(), Some("Standard V2"));
            assert_eq!(field("output_width").as_deref(), Some("80"));
            assert_eq!(field("denoise").as_deref(), Some("0.3"));
            assert_eq!(field("output_format").as_deref(), Some("png"));
        }

        assert!(matches!(
            topaz.poll(&api, &job, "pid-1").await,
            Ok(PollOutcome::Running { .. })
        ));
        match topaz.poll(&api, &job, "pid-1").await {
            Ok(PollOutcome::Succeeded(outs)) => {
                assert_eq!(
                    outs,
                    vec![PendingOutput::Provider {
                        key: "pid-1".into(),
                        ext: "png".into()
                    }]
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            topaz.poll(&api, &job, "unknown").await,
            Ok(PollOutcome::Lost { .. })
        ));
        assert!(matches!(
            topaz.poll(&api, &job, "garbage").await,
            Err(ProviderError::Transient { .. })
        ));

        let url = topaz
            .output_url(&api, "pid-1", "pid-1")
            .await
            .expect("link");
        assert_eq!(url, "https://files.example/pid-1.png?sig=x");
        assert!(matches!(
            topaz.output_url(&api, "early", "early").await,
            Err(ProviderError::Transient { .. })
        ));
        assert!(matches!(
            topaz.output_url(&api, "old", "old").await,
            Err(ProviderError::Lost(_))
        ));

        assert_eq!(topaz.cancel(&api, "pid-1").await, Ok(true));
        assert_eq!(topaz.cancel(&api, "done").await, Ok(false));
        topaz.cleanup(&api, "pid-1").await.expect("cleanup");
        assert_eq!(
            seen.lock().expect("lock").deleted,
            vec!["pid-1".to_string()]
        );
    }

    #[tokio::test]
    async fn a_lost_submission_is_found_by_its_file_name() {
        let (api, _) = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = job_spec(dir.path(), "enhance", json!({}));
        let topaz = Topaz::new("key".into());
        let job = |key: &str| JobContext {
            spec: &spec,
            submit_key: key.into(),
            submission: 1,
            prepared: &[],
        };
        assert_eq!(
            topaz.reconcile(&api, &job("job1~1")).await,
            Ok(Reconciliation::Found {
                remote_id: "pid-1".into()
            })
        );
        assert_eq!(
            topaz.reconcile(&api, &job("job1~2")).await,
            Ok(Reconciliation::NotSubmitted)
        );
    }

    #[tokio::test]
    async fn sync_enhance_returns_the_image() {
        let (api, seen) = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = job_spec(dir.path(), "enhance-sync", json!({}));
        let job = JobContext {
            spec: &spec,
            submit_key: "job1~3".into(),
            submission: 1,
            prepared: &[],
        };
        let legacy = format!("{LEGACY_KEY_PREFIX}abc");
        let outcome = Topaz::new(legacy.clone())
            .submit(&api, &job)
            .await
            .expect("submit");
        match outcome {
            SubmitOutcome::Finished { remote_id, outputs } => {
                assert_eq!(remote_id.as_deref(), Some("pid-sync"));
                match outputs.as_slice() {
                    [OutputData::Bytes { data, ext }] => {
                        assert_eq!(ext, "png");
                        assert_eq!(
                            crate::providers::util::dimensions_from_bytes(data),
                            Some((8, 6))
                        );
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            seen.lock().expect("lock").api_key,
            Some(format!("Bearer {legacy}"))
        );
    }

    #[tokio::test]
    async fn provider_refusals_are_permanent_with_the_message() {
        let (api, _) = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = job_spec(dir.path(), "enhance-gen", json!({"creativity": 2}));
        let job = JobContext {
            spec: &spec,
            submit_key: "job1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let e = Topaz::new("k".into())
            .submit(&api, &job)
            .await
            .expect_err("402");
        assert_eq!(
            e,
            ProviderError::permanent("HTTP 402 Payment Required: Insufficient funds.")
        );

        // A missing input fails before anything is sent.
        let mut missing = spec.clone();
        missing.inputs = vec![dir.path().join("nope.png").to_string_lossy().into_owned()];
        let job = JobContext {
            spec: &missing,
            submit_key: "job1~1".into(),
            submission: 1,
            prepared: &[],
        };
        assert!(matches!(
            Topaz::new("k".into()).submit(&api, &job).await,
            Err(ProviderError::Permanent(_))
        ));
    }

    #[tokio::test]
    async fn estimate_sends_the_input_size() {
        let (api, seen) = server().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = job_spec(dir.path(), "enhance", json!({"output_height": 60}));
        let est = Topaz::new("k".into())
            .estimate(&api, &spec)
            .await
            .expect("estimate");
        assert_eq!(
            est,
            Estimate {
                duration_s: 30,
                credits: Some(2)
            }
        );
        let fields = seen.lock().expect("lock").fields.clone();
        assert!(
            fields.contains(&("input_width".into(), "40".into())),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("input_height".into(), "30".into())),
            "{fields:?}"
        );
        assert!(
            fields.contains(&("output_height".into(), "60".into())),
            "{fields:?}"
        );
    }

    #[tokio::test]
    async fn a_dead_server_is_transient_before_sending_and_unknown_is_never_claimed_for_connect_errors(
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let api = Api::new(
            &format!("http://{addr}"),
            reqwest::Client::new(),
            Arc::new(OpenGate),
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = job_spec(dir.path(), "enhance", json!({}));
        let job = JobContext {
            spec: &spec,
            submit_key: "job1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let e = Topaz::new("k".into())
            .submit(&api, &job)
            .await
            .expect_err("refused");
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
    }
}

/// The adapter against the built-in simulator (`crate::sim`).
#[cfg(test)]
mod sim_tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::sim::SimHandle;

    async fn start() -> (SimHandle, Api) {
        let (sim, api) = crate::providers::sim_api(
            crate::model::ProviderKind::Topaz,
            Duration::from_millis(300),
        )
        .await;
        (sim, api)
    }

    fn spec(
        dir: &std::path::Path,
        operation: &str,
        prompt: Option<&str>,
        params: Value,
    ) -> JobSpec {
        let path = dir.join("in.png");
        let img =
            image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 40]));
        img.save(&path).expect("write png");
        JobSpec {
            id: "job1".into(),
            provider: ProviderKind::Topaz,
            operation: operation.into(),
            inputs: vec![path.to_string_lossy().into_owned()],
            prompt: prompt.map(str::to_string),
            params_json: params.to_string(),
            output: None,
            metadata: Vec::new(),
        }
    }

    async fn wait_done(topaz: &Topaz, api: &Api, job: &JobContext<'_>, id: &str) -> PollOutcome {
        for _ in 0..100 {
            match topaz.poll(api, job, id).await.expect("poll") {
                PollOutcome::Running { .. } => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
        panic!("task {id} never finished")
    }

    #[tokio::test]
    async fn reconciliation_walks_the_paginated_status_list() {
        let (sim, api) = start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec(dir.path(), "enhance", None, json!({"output_width": 80}));
        let mut topaz = Topaz::new("sim-key".into());
        // Two statuses a page: five tasks take three pages.
        topaz.status_page = 2;
        let mut ids = Vec::new();
        for n in 1..=5 {
            let job = JobContext {
                spec: &spec,
                submit_key: format!("k{n}~1"),
                submission: 1,
                prepared: &[],
            };
            let SubmitOutcome::Accepted { remote_id, .. } =
                topaz.submit(&api, &job).await.expect("submit")
            else {
                panic!("not accepted")
            };
            ids.push(remote_id);
        }
        let ctx = |key: &str| JobContext {
            spec: &spec,
            submit_key: key.into(),
            submission: 1,
            prepared: &[],
        };
        let lists = || async {
            let v: Value = reqwest::get(format!("{}/_sim/ledger", sim.base_url()))
                .await
                .expect("ledger")
                .json()
                .await
                .expect("ledger json");
            v["entries"]
                .as_array()
                .map(|l| l.iter().filter(|e| e["endpoint"] == "status_all").count())
                .unwrap_or(0)
        };
        // On the last page.
        assert_eq!(
            topaz.reconcile(&api, &ctx("k5~1")).await,
            Ok(Reconciliation::Found {
                remote_id: ids[4].clone()
            })
        );
        assert_eq!(lists().await, 3, "three pages were read");
        // Nowhere: every page read, then "not submitted".
        assert_eq!(
            topaz.reconcile(&api, &ctx("k9~1")).await,
            Ok(Reconciliation::NotSubmitted)
        );
        assert_eq!(lists().await, 6);
        // One page is enough for the access check.
        assert!(topaz.check_access(&api).await.is_ok());
        let _ = sim.shutdown().await;
    }

    #[test]
    fn the_account_api_sits_beside_the_image_api() {
        assert_eq!(
            account_url("https://api.topazlabs.com/image/v1", "/credits/balance").ok(),
            Some("https://api.topazlabs.com/account/v1/credits/balance".to_string())
        );
        assert_eq!(
            account_url("http://127.0.0.1:9/topaz/image/v1/", "/credits/balance").ok(),
            Some("http://127.0.0.1:9/topaz/account/v1/credits/balance".to_string())
        );
        assert!(account_url("https://example.com/api", "/x").is_err());
        let b = parse_balance(&json!({"available_credits": 100, "reserved_credits": 10}))
            .expect("balance");
        assert_eq!((b.amount, b.unit.as_str()), (100.0, "credits"));
        assert_eq!(parse_balance(&json!({"total_credits": 1})), None);
    }

    #[test]
    fn credits_come_from_the_published_tables() {
        let c = |op: &str, params: Value| {
            table_credits(&JobSpec {
                id: "t".into(),
                provider: ProviderKind::Topaz,
                operation: op.into(),
                inputs: vec!["https://example.com/a.png".into()],
                prompt: None,
                params_json: params.to_string(),
                output: None,
                metadata: Vec::new(),
            })
        };
        // Standard V2 at 24 MP a credit: 32 MP -> 2, 24 MP -> 1.
        assert_eq!(
            c(
                "enhance",
                json!({"output_width": 8000, "output_height": 4000})
            ),
            Some(2.0)
        );
        assert_eq!(
            c(
                "enhance",
                json!({"output_width": 6000, "output_height": 4000})
            ),
            Some(1.0)
        );
        // Redefine at 4: 100 MP -> 25; Bloom 2 at 2: 100 MP -> 50.
        assert_eq!(
            c(
                "enhance-gen",
                json!({"output_width": 10000, "output_height": 10000})
            ),
            Some(25.0)
        );
        assert_eq!(
            c(
                "enhance-gen",
                json!({"model": "Bloom 2", "output_width": 10000, "output_height": 10000})
            ),
            Some(50.0)
        );
        // No table (Recovery V2, the filters), no size, a URL input with one side.
        assert_eq!(
            c(
                "enhance-gen",
                json!({"model": "Recovery V2", "output_width": 100, "output_height": 100})
            ),
            None
        );
        assert_eq!(c("sharpen", json!({})), None);
        assert_eq!(c("enhance", json!({})), None);
        assert_eq!(c("enhance", json!({"output_width": 100})), None);
    }

    #[test]
    fn status_pages_are_read_leniently() {
        let p = read_status_page(
            br#"{"statuses":[{"process_id":"a","filename":"k~1.png"}],"next_cursor":"x","has_next_page":true}"#,
        )
        .expect("page");
        assert_eq!((p.statuses.len(), p.next_cursor.as_deref()), (1, Some("x")));
        let p = read_status_page(br#"{"data":[],"next_cursor":"x","has_next_page":false}"#)
            .expect("page");
        assert_eq!(p.next_cursor, None);
        let p = read_status_page(br#"[{"process_id":"a"}]"#).expect("plain");
        assert_eq!((p.statuses.len(), p.next_cursor), (1, None));
        assert!(read_status_page(b"7").is_err());
    }

    #[tokio::test]
    async fn enhance_end_to_end() {
        let (sim, api) = start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec(
            dir.path(),
            "enhance",
            None,
            json!({"output_width": 128, "output_format": "png"}),
        );
        assert!(validate(&spec).is_empty(), "{:?}", validate(&spec));
        let job = JobContext {
            spec: &spec,
            submit_key: "job1~1".into(),
            submission: 1,
            prepared: &[],
        };
        let topaz = Topaz::new("sim-key".into());

        let est = topaz.estimate(&api, &spec).await.expect("estimate");
        assert!(est.credits.unwrap_or(1) >= 1, "{est:?}");

        let SubmitOutcome::Accepted { remote_id, .. } =
            topaz.submit(&api, &job).await.expect("submit")
        else {
            panic!("not accepted")
        };
        // A lost answer is found again by its file name.
        assert_eq!(
            topaz.reconcile(&api, &job).await,
            Ok(Reconciliation::Found {
                remote_id: remote_id.clone()
            })
        );
        let other = JobContext {
            submit_key: "job1~2".into(),
            submission: 1,
            ..job.clone()
        };
        assert_eq!(
            topaz.reconcile(&api, &other).await,
            Ok(Reconciliation::NotSubmitted)
        );

        let PollOutcome::Succeeded(outputs) = wait_done(&topaz, &api, &job, &remote_id).await
        else {
            panic!("not succeeded")
        };
        let [PendingOutput::Provider { key, ext }] = outputs.as_slice() else {
            panic!("{outputs:?}")
        };
        assert_eq!(ext, "png");
        let url = topaz.output_url(&api, &remote_id, key).await.expect("link");
        let bytes = reqwest::get(&url)
            .await
            .expect("download")
            .bytes()
            .await
            .expect("body");
        assert_eq!(util::dimensions_from_bytes(&bytes), Some((128, 96)));

        topaz.cleanup(&api, &remote_id).await.expect("cleanup");
        assert!(matches!(
            topaz.poll(&api, &job, &remote_id).await,
            Ok(PollOutcome::Lost { .. })
        ));
        topaz
            .cleanup(&api, &remote_id)
            .await
            .expect("cleanup twice");
        let _ = sim.shutdown().await;
    }

    #[tokio::test]
    async fn sync_gen_and_cancel_end_to_end() {
        let (sim, api) = start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let topaz = Topaz::new("sim-key".into());

        let sync = spec(
            dir.path(),
            "enhance-sync",
            None,
            json!({"output_height": 96}),
        );
        let job = JobContext {
            spec: &sync,
            submit_key: "job1~1".into(),
            submission: 1,
            prepared: &[],
        };
        match topaz.submit(&api, &job).await.expect("sync submit") {
            SubmitOutcome::Finished { remote_id, outputs } => {
                assert!(remote_id.is_some());
                let [OutputData::Bytes { data, ext }] = outputs.as_slice() else {
                    panic!("{outputs:?}")
                };
                assert_eq!(ext, "jpg");
                assert_eq!(util::dimensions_from_bytes(data), Some((128, 96)));
            }
            other => panic!("{other:?}"),
        }

        let gen = spec(
            dir.path(),
            "enhance-gen",
            Some("a red fox"),
            json!({"creativity": 3, "texture": 2}),
        );
        assert!(validate(&gen).is_empty(), "{:?}", validate(&gen));
        let job = JobContext {
            spec: &gen,
            submit_key: "job1~2".into(),
            submission: 1,
            prepared: &[],
        };
        let SubmitOutcome::Accepted { remote_id, .. } =
            topaz.submit(&api, &job).await.expect("gen")
        else {
            panic!("not accepted")
        };
        assert_eq!(topaz.cancel(&api, &remote_id).await, Ok(true));
        assert!(matches!(
            wait_done(&topaz, &api, &job, &remote_id).await,
            PollOutcome::Cancelled
        ));
        assert_eq!(topaz.cancel(&api, &remote_id).await, Ok(false));

        let e = Topaz::new("invalid-key".into())
            .submit(&api, &job)
            .await
            .expect_err("bad key");
        assert!(
            matches!(&e, ProviderError::Credential(m) if m.contains("401") && m.contains("TOPAZ_API_KEY")),
            "{e:?}"
        );
        let _ = sim.shutdown().await;
    }
}
