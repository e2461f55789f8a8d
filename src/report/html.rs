//! The HTML gallery: one page, no network. A dense grid of tiles (a job's first input
//! and output side by side, its state, provider, duration, output pixel size and the
//! start of its error), sortable by state, provider, duration and error, filterable
//! by state, provider and text, the failures one button away; a tile opens the job in
//! full (every preview, the error, the row, the timings). Usable at 420 px wide.
//!
//! The page is written as it streams: the rows go into one JSON array inside a
//! `<script type="application/json">`, then the totals, then the inline script that
//! renders a page of tiles at a time (200), so a report of 100,000 jobs is a long
//! JSON text, not 100,000 DOM nodes. Without JavaScript a `<noscript>` table lists the
//! first 1,000 jobs, the failed first. Previews are `data:` URIs made by `thumbnail`
//! for the first `max_thumbnail_jobs` jobs and for as many failed jobs after them
//! (the rest are listed with a note), so the file stays a size a browser opens:
//! ~10 KB per job with previews. A Content-Security-Policy forbids every fetch: the
//! page cannot reach the network even for a URL input.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::thumbnail::{self, Thumb};
use crate::query::{self, JobRow};

const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");

/// Rows thumbnailed together (on several threads) before they are written.
const BATCH: usize = 32;
/// Previews per side of one job; a job with more inputs or outputs lists the rest.
const PICS_PER_SIDE: usize = 4;
/// Previews kept for reuse (an input shared by many jobs is decoded once); the
/// cache is emptied when full.
const THUMB_CACHE: usize = 1024;

#[derive(Debug, Clone)]
pub struct HtmlOptions {
    /// The folder output paths are relative to when given (`--out`); else each
    /// job's recorded folder (`JobRow::out_dir`), else `out`.
    pub out_dir: Option<PathBuf>,
    /// Jobs (in report order) whose pictures are previewed.
    pub max_thumbnail_jobs: u64,
    /// Longest side of a preview, in pixels.
    pub thumb_side: u32,
    /// Where the rows came from, for the page's header.
    pub source: String,
}

impl Default for HtmlOptions {
    fn default() -> Self {
        HtmlOptions {
            out_dir: None,
            max_thumbnail_jobs: 1000,
            thumb_side: 128,
            source: String::new(),
        }
    }
}

/// One picture on the page.
#[derive(Debug, Serialize)]
struct Pic {
    /// The file name (or URL) shown under the picture.
    name: String,
    /// A link to the full picture (`file://` for local files).
    href: Option<String>,
    /// The preview (`data:` URI) …
    src: Option<String>,
    w: Option<u32>,
    h: Option<u32>,
    /// … or why there is none (neither: past the preview cap).
    note: Option<String>,
    /// The full picture's size, "W×H".
    size: Option<String>,
}

#[derive(Debug, Serialize)]
struct Card {
    id: String,
    provider: String,
    operation: String,
    state: String,
    error: Option<String>,
    origin: String,
    prompt: Option<String>,
    /// The params as JSON text ("" when none).
    params: String,
    /// The manifest's extra columns.
    metadata: crate::query::Metadata,
    remote_id: Option<String>,
    attempts: u32,
    submissions: u32,
    possible_duplicates: u32,
    created: String,
    started: Option<String>,
    finished: Option<String>,
    duration_s: Option<f64>,
    inputs: Vec<Pic>,
    outputs: Vec<Pic>,
    /// Inputs and outputs not shown.
    more_inputs: usize,
    more_outputs: usize,
}

#[derive(Debug, Serialize)]
struct Meta<'a> {
    generated: String,
    source: &'a str,
    /// The folders the outputs shown are in (`--out`, or the runs' own).
    out_dirs: Vec<String>,
    jobs: u64,
    thumbnail_jobs: u64,
    failed_previews: u64,
    max_thumbnail_jobs: u64,
    /// state → provider → jobs.
    counts: BTreeMap<String, BTreeMap<String, u64>>,
    version: &'static str,
}

/// Writes the page as rows arrive: `push` each row, then `finish`.
pub struct HtmlReport<W: Write> {
    out: W,
    opts: HtmlOptions,
    batch: Vec<JobRow>,
    jobs: u64,
    thumbnail_jobs: u64,
    /// Failed jobs past the cap that got previews all the same.
    failed_previews: u64,
    counts: BTreeMap<String, BTreeMap<String, u64>>,
    thumbs: HashMap<String, Thumb>,
    out_dirs: std::collections::BTreeSet<String>,
    /// The listing shown without JavaScript (`<noscript>`): the failed jobs first,
    /// then the others, [`STATIC_ROWS`] at most.
    static_failed: Vec<String>,
    static_other: Vec<String>,
}

/// Jobs in the listing shown without JavaScript (a table row each, no previews).
const STATIC_ROWS: usize = 1000;

impl<W: Write> HtmlReport<W> {
    pub fn new(mut out: W, mut opts: HtmlOptions) -> io::Result<Self> {
        opts.out_dir = opts.out_dir.map(|d| std::path::absolute(&d).unwrap_or(d));
        write!(
            out,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; \
             img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n\
             <title>pixbatch report</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n\
             <header>\n<h1>pixbatch report</h1>\n<p id=\"summary\"></p>\n\
             <nav id=\"chips\"></nav>\n\
             <form id=\"filters\" onsubmit=\"return false\">\n\
             <label>State <select id=\"f-state\"><option value=\"\">all</option></select></label>\n\
             <label>Provider <select id=\"f-provider\"><option value=\"\">all</option></select></label>\n\
             <label>Sort <select id=\"f-sort\"></select></label>\n\
             <label>Search <input id=\"f-q\" type=\"search\" placeholder=\"id, error, file, sku…\"></label>\n\
             <span id=\"pager\"></span>\n</form>\n</header>\n\
             <main id=\"jobs\"></main>\n<div id=\"detail\" hidden></div>\n\
             <script id=\"jobs-data\" type=\"application/json\">["
        )?;
        Ok(HtmlReport {
            out,
            opts,
            batch: Vec::with_capacity(BATCH),
            jobs: 0,
            thumbnail_jobs: 0,
            failed_previews: 0,
            counts: BTreeMap::new(),
            thumbs: HashMap::new(),
            out_dirs: Default::default(),
            static_failed: Vec::new(),
            static_other: Vec::new(),
        })
    }

    pub fn push(&mut self, row: JobRow) -> io::Result<()> {
        self.batch.push(row);
        if self.batch.len() >= BATCH {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> io::Result<()> {
        let rows = std::mem::take(&mut self.batch);
        // The first `max_thumbnail_jobs` jobs get previews, and failed jobs past them
        // as many again: the failures are what a person opens the report for.
        let previewed: Vec<bool> = rows
            .iter()
            .map(|r| {
                if self.thumbnail_jobs < self.opts.max_thumbnail_jobs {
                    self.thumbnail_jobs += 1;
                    true
                } else if r.state == crate::model::JobState::Failed
                    && self.failed_previews < self.opts.max_thumbnail_jobs
                {
                    self.failed_previews += 1;
                    true
                } else {
                    false
                }
            })
            .collect();
        let mut wanted: Vec<String> = rows
            .iter()
            .zip(&previewed)
            .filter(|(_, p)| **p)
            .flat_map(|(r, _)| sources(r, &self.opts))
            .filter(|s| !self.thumbs.contains_key(s))
            .collect();
        wanted.sort();
        wanted.dedup();
        if self.thumbs.len() + wanted.len() > THUMB_CACHE {
            self.thumbs.clear();
        }
        self.thumbs
            .extend(make_thumbs(wanted, self.opts.thumb_side));
        for (i, row) in rows.iter().enumerate() {
            let thumbs = previewed[i].then_some(&self.thumbs);
            let card = card(row, thumbs, &self.opts);
            let list = if row.state == crate::model::JobState::Failed {
                &mut self.static_failed
            } else {
                &mut self.static_other
            };
            if list.len() < STATIC_ROWS {
                list.push(static_row(row));
            }
            if !row.outputs.is_empty() && self.out_dirs.len() < 8 {
                let dir = super::out_dir_of(row, self.opts.out_dir.as_deref());
                self.out_dirs.insert(
                    std::path::absolute(&dir)
                        .unwrap_or(dir)
                        .display()
                        .to_string(),
                );
            }
            *self
                .counts
                .entry(row.state.name().to_string())
                .or_default()
                .entry(row.provider.name().to_string())
                .or_default() += 1;
            if self.jobs > 0 {
                self.out.write_all(b",\n")?;
            }
            self.jobs += 1;
            self.out.write_all(script_safe_json(&card)?.as_bytes())?;
        }
        Ok(())
    }

    /// Writes the totals and the script; returns the writer (flushed).
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_batch()?;
        let meta = Meta {
            generated: query::rfc3339(crate::model::now_ms()),
            source: &self.opts.source,
            out_dirs: std::mem::take(&mut self.out_dirs).into_iter().collect(),
            jobs: self.jobs,
            thumbnail_jobs: self.thumbnail_jobs,
            failed_previews: self.failed_previews,
            max_thumbnail_jobs: self.opts.max_thumbnail_jobs,
            counts: std::mem::take(&mut self.counts),
            version: env!("CARGO_PKG_VERSION"),
        };
        write!(
            self.out,
            "]</script>\n<script id=\"meta-data\" type=\"application/json\">{}</script>\n\
             <script>\n{JS}</script>\n",
            script_safe_json(&meta)?
        )?;
        let (jobs, counts) = (meta.jobs, meta.counts);
        self.write_static(jobs, &counts)?;
        self.out.write_all(b"</body>\n</html>\n")?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Write> HtmlReport<W> {
    /// The page without JavaScript: the totals and a table of the jobs (failures
    /// first), so the report can be read in a mail client or a locked-down browser.
    fn write_static(
        &mut self,
        jobs: u64,
        counts: &BTreeMap<String, BTreeMap<String, u64>>,
    ) -> io::Result<()> {
        let mut totals = Vec::new();
        for (state, per) in counts {
            totals.push(format!("{} {state}", per.values().sum::<u64>()));
        }
        write!(
            self.out,
            "<noscript>\n<style>#filters, #chips, main {{ display: none; }}</style>\n<p class=\"noscript\">{} jobs: {}. Without JavaScript this page \
             lists {} of them (the failed first) without previews, sorting or filters; \
             every job is in <code>pixbatch report --format csv</code>.</p>\n\
             <table class=\"static\"><tr><th>id</th><th>state</th><th>provider · operation</th>\
             <th>took</th><th>outputs</th><th>error</th></tr>\n",
            jobs,
            esc(&totals.join(", ")),
            (self.static_failed.len() + self.static_other.len()).min(STATIC_ROWS),
        )?;
        let room = STATIC_ROWS.saturating_sub(self.static_failed.len());
        for row in self
            .static_failed
            .iter()
            .chain(self.static_other.iter().take(room))
            .take(STATIC_ROWS)
        {
            self.out.write_all(row.as_bytes())?;
        }
        self.out.write_all(b"</table>\n</noscript>\n")
    }
}

/// One job's row of the listing shown without JavaScript.
fn static_row(r: &JobRow) -> String {
    let outputs: Vec<String> = r
        .outputs
        .iter()
        .enumerate()
        .map(|(i, o)| match r.pixels.get(i).and_then(|p| p.as_deref()) {
            Some(px) => format!("{o} ({})", px.replace('x', "×")),
            None => o.clone(),
        })
        .collect();
    format!(
        "<tr><td>{}</td><td>{}</td><td>{} · {}</td><td>{}</td><td>{}</td><td class=\"err\">{}</td></tr>\n",
        esc(&r.id),
        r.state,
        r.provider,
        esc(&r.operation),
        r.duration_s.map(|d| format!("{d:.1} s")).unwrap_or_default(),
        esc(&outputs.join(", ")),
        esc(r.error.as_deref().unwrap_or("")),
    )
}

/// Text for HTML element content.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// JSON that cannot end the `<script>` element it sits in: `<` only occurs inside
/// strings, where `\u003c` means the same.
fn script_safe_json<T: Serialize>(value: &T) -> io::Result<String> {
    let text = serde_json::to_string(value).map_err(io::Error::other)?;
    Ok(text.replace('<', "\\u003c"))
}

/// The files (or URLs) a job's previews are made from: its first inputs, and its
/// first outputs under the output folder.
fn sources(r: &JobRow, opts: &HtmlOptions) -> Vec<String> {
    let mut out: Vec<String> = r.inputs.iter().take(PICS_PER_SIDE).cloned().collect();
    out.extend(
        r.outputs
            .iter()
            .take(PICS_PER_SIDE)
            .map(|o| output_path(r, o, opts)),
    );
    out
}

/// Where output `rel` of row `r` is: under `--out`, or the folder the run recorded.
fn output_path(r: &JobRow, rel: &str, opts: &HtmlOptions) -> String {
    let dir = super::out_dir_of(r, opts.out_dir.as_deref());
    std::path::absolute(&dir)
        .unwrap_or(dir)
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

/// Previews of `sources`, made on a few threads (decoding a photo takes tens of
/// milliseconds). A thread that panics in the decoder loses only its previews.
fn make_thumbs(sources: Vec<String>, side: u32) -> Vec<(String, Thumb)> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    if sources.len() <= 1 || workers == 1 {
        return sources
            .into_iter()
            .map(|s| {
                let t = thumbnail::make(&s, side);
                (s, t)
            })
            .collect();
    }
    let per = sources.len().div_ceil(workers);
    std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|s| (s.clone(), thumbnail::make(s, side)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// A job's card; `thumbs` holds its previews, or is None past the preview cap.
fn card(r: &JobRow, thumbs: Option<&HashMap<String, Thumb>>, opts: &HtmlOptions) -> Card {
    let inputs = &r.inputs;
    let outputs = &r.outputs;
    let pics = |items: &[String], resolve: &dyn Fn(&str) -> String| -> Vec<Pic> {
        items
            .iter()
            .take(PICS_PER_SIDE)
            .map(|item| {
                let source = resolve(item);
                let thumb = thumbs.map(|map| {
                    map.get(&source).cloned().unwrap_or(Thumb::None {
                        note: "no preview (the previewer failed)".into(),
                    })
                });
                pic(&source, item, thumb)
            })
            .collect()
    };
    Card {
        id: r.id.clone(),
        provider: r.provider.name().to_string(),
        operation: r.operation.clone(),
        state: r.state.name().to_string(),
        error: r.error.clone(),
        origin: r.origin.clone(),
        prompt: r.prompt.clone(),
        params: if r.params.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(r.params.clone()).to_string()
        },
        metadata: r.metadata.clone(),
        remote_id: r.remote_id.clone(),
        attempts: r.attempts,
        submissions: r.submissions,
        possible_duplicates: r.possible_duplicates,
        created: query::rfc3339(r.created_ms),
        started: r.started_ms.map(query::rfc3339),
        finished: r.finished_ms.map(query::rfc3339),
        duration_s: r.duration_s,
        inputs: pics(inputs, &|s| s.to_string()),
        outputs: pics(outputs, &|s| output_path(r, s, opts))
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                // The recorded pixel size, past the preview cap too.
                if p.size.is_none() {
                    p.size = r
                        .pixels
                        .get(i)
                        .and_then(|px| px.as_deref())
                        .map(|px| px.replace('x', "×"));
                }
                p
            })
            .collect(),
        more_inputs: inputs.len().saturating_sub(PICS_PER_SIDE),
        more_outputs: outputs.len().saturating_sub(PICS_PER_SIDE),
    }
}

/// `source` is a local path or a URL; `shown` what the job record says; `thumb`
/// None past the preview cap (the page says so once, not per picture).
fn pic(source: &str, shown: &str, thumb: Option<Thumb>) -> Pic {
    let remote = source.starts_with("http://") || source.starts_with("https://");
    let name = if remote {
        shown.to_string()
    } else {
        Path::new(shown)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| shown.to_string())
    };
    let href = if remote {
        Some(source.to_string())
    } else {
        url::Url::from_file_path(source).ok().map(String::from)
    };
    let mut p = Pic {
        name,
        href,
        src: None,
        w: None,
        h: None,
        note: None,
        size: None,
    };
    match thumb {
        Some(Thumb::Image {
            data_uri,
            width,
            height,
            source_width,
            source_height,
        }) => {
            p.src = Some(data_uri);
            p.w = Some(width);
            p.h = Some(height);
            p.size = Some(format!("{source_width}×{source_height}"));
        }
        Some(Thumb::None { note }) => p.note = Some(note),
        None => {}
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{JobState, ProviderKind};

    fn row(id: &str, state: JobState, inputs: &str, outputs: &str) -> JobRow {
        JobRow {
            id: id.into(),
            provider: ProviderKind::Topaz,
            operation: "enhance".into(),
            state,
            inputs: inputs
                .split('|')
                .filter(|s| !s.is_empty())
                .map(Into::into)
                .collect(),
            prompt: None,
            params: Default::default(),
            output: None,
            metadata: Default::default(),
            outputs: outputs
                .split('|')
                .filter(|s| !s.is_empty())
                .map(Into::into)
                .collect(),
            sha256: Vec::new(),
            pixels: Vec::new(),
            out_dir: None,
            bytes: 0,
            remote_id: None,
            attempts: 0,
            submissions: 1,
            possible_duplicates: 0,
            error: (state == JobState::Failed).then(|| "bad </script><b>x</b>".into()),
            origin: "jobs.csv:2".into(),
            created_ms: 1_700_000_000_000,
            started_ms: Some(1_700_000_001_000),
            finished_ms: Some(1_700_000_003_500),
            duration_s: Some(2.5),
        }
    }

    /// The JSON array and the totals, read back out of the page.
    fn data(page: &str) -> (Vec<serde_json::Value>, serde_json::Value) {
        let grab = |id: &str| {
            let start = page
                .find(&format!("<script id=\"{id}\" type=\"application/json\">"))
                .unwrap();
            let rest = &page[start..];
            let open = rest.find('>').unwrap() + 1;
            let close = rest.find("</script>").unwrap();
            serde_json::from_str::<serde_json::Value>(&rest[open..close]).unwrap()
        };
        let jobs = grab("jobs-data").as_array().unwrap().clone();
        (jobs, grab("meta-data"))
    }

    #[test]
    fn streams_every_row_with_previews_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("out");
        std::fs::create_dir_all(&out_dir).unwrap();
        let input = dir.path().join("in.png");
        image::RgbImage::from_pixel(40, 40, image::Rgb([10, 200, 10]))
            .save(&input)
            .unwrap();
        image::RgbImage::from_pixel(80, 80, image::Rgb([10, 10, 200]))
            .save(out_dir.join("o.png"))
            .unwrap();
        let opts = HtmlOptions {
            out_dir: Some(out_dir.clone()),
            max_thumbnail_jobs: 50,
            thumb_side: 32,
            source: "test".into(),
        };
        let mut report = HtmlReport::new(Vec::new(), opts).unwrap();
        for i in 0..70 {
            let state = if i % 10 == 3 {
                JobState::Failed
            } else {
                JobState::Done
            };
            let outputs = if state == JobState::Done { "o.png" } else { "" };
            report
                .push(row(
                    &format!("j{i}"),
                    state,
                    input.to_str().unwrap(),
                    outputs,
                ))
                .unwrap();
        }
        let page = String::from_utf8(report.finish().unwrap()).unwrap();
        // The provider's text cannot close the data script early.
        assert!(!page.contains("bad </script>"));
        assert_eq!(page.matches("</script>").count(), 3);
        let (jobs, meta) = data(&page);
        assert_eq!(jobs.len(), 70);
        assert_eq!(meta["jobs"], 70);
        assert_eq!(meta["thumbnail_jobs"], 50);
        assert_eq!(meta["failed_previews"], 2);
        assert_eq!(meta["counts"]["failed"]["topaz"], 7);
        assert_eq!(meta["counts"]["done"]["topaz"], 63);
        for (i, j) in jobs.iter().enumerate() {
            assert_eq!(j["id"], format!("j{i}"), "rows keep their order");
            let input = &j["inputs"][0];
            assert_eq!(input["name"], "in.png");
            assert!(input["href"].as_str().unwrap().starts_with("file:///"));
            // Past the cap only the failed jobs (j53, j63) keep their previews.
            if i < 50 || i % 10 == 3 {
                assert!(input["src"]
                    .as_str()
                    .unwrap()
                    .starts_with("data:image/jpeg;base64,"));
                assert_eq!(input["w"], 32);
                assert_eq!(input["size"], "40×40");
            } else {
                assert!(input["src"].is_null());
                assert!(input["note"].is_null());
            }
        }
        let failed = &jobs[3];
        assert_eq!(failed["state"], "failed");
        assert_eq!(failed["error"], "bad </script><b>x</b>");
        assert_eq!(failed["outputs"].as_array().unwrap().len(), 0);
        assert_eq!(jobs[0]["outputs"][0]["w"], 32);
        assert_eq!(jobs[0]["duration_s"], 2.5);
        assert!(page.contains("default-src 'none'"));
    }

    #[test]
    fn an_empty_queue_is_a_valid_page() {
        let page = HtmlReport::new(Vec::new(), HtmlOptions::default())
            .unwrap()
            .finish()
            .unwrap();
        let (jobs, meta) = data(&String::from_utf8(page).unwrap());
        assert!(jobs.is_empty());
        assert_eq!(meta["jobs"], 0);
    }
}
