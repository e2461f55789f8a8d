//! `report --format html`: the page renders in a real headless browser (Debian's
//! chromium) with the previews where they belong, and its filters work.
//!
//! Without chromium the browser tests skip with a loud message, unless
//! `PIXBATCH_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs chromium): then a
//! missing browser fails them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// Colours far from anything the page's own styles use, so a pixel of one of them
/// on the screenshot is a pixel of a preview.
const MAGENTA: [u8; 3] = [220, 30, 200];
const CYAN: [u8; 3] = [20, 200, 210];
const YELLOW: [u8; 3] = [230, 210, 20];
const TOLERANCE: u8 = 14;

fn browser() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PIXBATCH_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// The browser, or None after saying loudly that the test is skipped (a failure
/// when the environment requires a browser).
fn browser_or_skip(test: &str) -> Option<PathBuf> {
    let found = browser();
    if found.is_none() {
        assert!(
            std::env::var("PIXBATCH_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "PIXBATCH_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)"
        );
        eprintln!(
            "\n*** SKIPPED {test}: no chromium on PATH (apt-get install chromium, \
             or set PIXBATCH_CHROMIUM); set PIXBATCH_REQUIRE_BROWSER=1 to make this fail ***\n"
        );
    }
    found
}

/// Headless chromium with the flags that keep it off the network and quick.
fn chromium(browser: &Path, profile: &Path) -> Command {
    let mut c = Command::new(browser);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdin(Stdio::null());
    c
}

/// A screenshot of `url` at 1000×`height`, decoded.
fn screenshot(browser: &Path, dir: &Path, url: &str, height: u32) -> image::RgbImage {
    screenshot_at(browser, dir, url, 1000, height)
}

/// A screenshot of `url` in a `width`×`height` window, decoded.
fn screenshot_at(
    browser: &Path,
    dir: &Path,
    url: &str,
    width: u32,
    height: u32,
) -> image::RgbImage {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let png = dir.join(format!("shot-{n}.png"));
    let mut c = chromium(browser, &dir.join(format!("profile-{n}")));
    c.arg(format!("--screenshot={}", png.display()))
        .arg(format!("--window-size={width},{height}"))
        .arg(url);
    let out = run_to_end(c, Duration::from_secs(90));
    assert!(png.exists(), "chromium made no screenshot\n{}", text(&out));
    image::open(&png)
        .unwrap_or_else(|e| panic!("{}: {e}", png.display()))
        .to_rgb8()
}

/// The DOM after the page's script ran.
fn dump_dom(browser: &Path, dir: &Path, url: &str) -> String {
    let mut c = chromium(browser, &dir.join("profile-dom"));
    c.arg("--dump-dom").arg(url);
    let out = run_to_end(c, Duration::from_secs(90));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The areas of the screenshot in colour `rgb`: horizontal runs of columns holding
/// such pixels, each with its column range, row range and pixel count.
#[derive(Debug, Clone, Copy)]
struct Blob {
    x0: u32,
    x1: u32,
    y0: u32,
    y1: u32,
    pixels: u32,
}

fn blobs(img: &image::RgbImage, rgb: [u8; 3]) -> Vec<Blob> {
    let near = |p: &image::Rgb<u8>| p.0.iter().zip(rgb).all(|(a, b)| a.abs_diff(b) <= TOLERANCE);
    let mut out: Vec<Blob> = Vec::new();
    let mut current: Option<Blob> = None;
    for x in 0..img.width() {
        let mut column: Option<(u32, u32, u32)> = None;
        for y in 0..img.height() {
            if near(img.get_pixel(x, y)) {
                column = Some(match column {
                    None => (y, y, 1),
                    Some((a, _, n)) => (a, y, n + 1),
                });
            }
        }
        match (column, current.as_mut()) {
            // Columns with a stray pixel or two (anti-aliasing) do not count.
            (Some((y0, y1, n)), Some(b)) if n >= 8 => {
                b.x1 = x;
                b.y0 = b.y0.min(y0);
                b.y1 = b.y1.max(y1);
                b.pixels += n;
            }
            (Some((y0, y1, n)), None) if n >= 8 => {
                current = Some(Blob {
                    x0: x,
                    x1: x,
                    y0,
                    y1,
                    pixels: n,
                })
            }
            _ => {
                if let Some(b) = current.take() {
                    out.push(b);
                }
            }
        }
    }
    out.extend(current);
    out
}

fn solid_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    image::RgbImage::from_pixel(w, h, image::Rgb(rgb))
        .save(path)
        .unwrap();
}

/// Three jobs with single-colour inputs: two done (Photio upscale keeps the colour,
/// Topaz enhance too), one failed (AIThriving refuses the prompt `sim-nsfw`).
fn run_three_jobs(sim: &Sim, dir: &Path) {
    solid_png(&dir.join("magenta.png"), 64, 64, MAGENTA);
    solid_png(&dir.join("cyan.png"), 64, 64, CYAN);
    solid_png(&dir.join("yellow.png"), 64, 64, YELLOW);
    std::fs::write(
        dir.join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         up-magenta,photio,upscale,magenta.png,,\n\
         enh-cyan,topaz,enhance,cyan.png,,\n\
         bad-yellow,aithriving,img2img,yellow.png,sim-nsfw,\"{\"\"width\"\":320,\"\"height\"\":320}\"\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir);
    sim.env(&mut cmd);
    cmd.args(["run", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

fn html_report(dir: &Path, file: &str) -> String {
    let out = pixbatch(dir)
        .args(["report", "--format", "html", "-o", file])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read_to_string(dir.join(file)).unwrap()
}

/// The centre pixel of a job's output file, as the page should show it.
fn output_colour(dir: &Path, job: &str) -> [u8; 3] {
    let files: Vec<_> = files_ending(&dir.join("out"), "")
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(job))
        .collect();
    assert_eq!(files.len(), 1, "outputs of {job}: {files:?}");
    let img = image::open(&files[0]).unwrap().to_rgb8();
    img.get_pixel(img.width() / 2, img.height() / 2).0
}

#[test]
fn html_report_shows_input_and_output_previews_side_by_side_in_chromium() {
    let Some(browser) = browser_or_skip("html_report_shows_input_and_output_previews") else {
        return;
    };
    let sim = Sim::start(&["--task-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    run_three_jobs(&sim, dir.path());
    let page = html_report(dir.path(), "report.html");
    // Self-contained: no fetch can leave the page.
    assert!(page.contains("default-src 'none'"));
    assert!(
        !page.contains("src=\"http"),
        "the page loads something from outside"
    );
    let url = url::Url::from_file_path(dir.path().join("report.html"))
        .unwrap()
        .to_string();

    let shot = screenshot(&browser, dir.path(), &url, 900);
    // Kept outside the test's folder, to look at when a check below fails.
    let kept = std::env::temp_dir().join("pixbatch-report-html-last.png");
    shot.save(&kept).unwrap();
    let why = |what: &str| format!("{what}; the screenshot is {}", kept.display());
    for (job, input) in [("up-magenta", MAGENTA), ("enh-cyan", CYAN)] {
        let output = output_colour(dir.path(), job);
        let ins = blobs(&shot, input);
        let outs = blobs(&shot, output);
        // The 64 px input is shown at its size; the output (128 px or larger) fills
        // the tile's preview box (76 px).
        let input_blob = ins
            .iter()
            .find(|b| b.pixels >= 60 * 60)
            .unwrap_or_else(|| panic!("{}", why(&format!("no {job} input preview: {ins:?}"))));
        let output_blob = outs
            .iter()
            .find(|b| b.pixels >= 70 * 70 && b.x0 > input_blob.x1)
            .unwrap_or_else(|| {
                panic!(
                    "{}",
                    why(&format!(
                        "no {job} output preview right of its input {input_blob:?}: {outs:?}"
                    ))
                )
            });
        // Side by side: the same card, so the rows overlap.
        assert!(
            output_blob.y0 <= input_blob.y1 && input_blob.y0 <= output_blob.y1,
            "{}",
            why(&format!(
                "{job}: input {input_blob:?} and output {output_blob:?} are not side by side"
            ))
        );
    }
    // The failed job shows its input, and no output.
    let yellow = blobs(&shot, YELLOW);
    assert_eq!(
        yellow.iter().filter(|b| b.pixels >= 60 * 60).count(),
        1,
        "{}",
        why(&format!("the failed job's input: {yellow:?}"))
    );

    // The state filter, through the page's own script: only the failed job is left.
    let failed = screenshot(&browser, dir.path(), &format!("{url}#state=failed"), 900);
    assert!(
        blobs(&failed, YELLOW).iter().any(|b| b.pixels >= 60 * 60),
        "the failed job is filtered out"
    );
    for colour in [MAGENTA, CYAN] {
        assert!(
            blobs(&failed, colour).iter().all(|b| b.pixels < 100),
            "a done job is still shown under state=failed"
        );
    }

    // The provider filter and the rest of the card, in the DOM after the script ran.
    // (`open=` shows the job in full, as a click on its tile does.)
    let dom = dump_dom(
        &browser,
        dir.path(),
        &format!("{url}#provider=aithriving&open=bad-yellow"),
    );
    assert!(dom.contains("data-id=\"bad-yellow\""), "{dom}");
    assert!(!dom.contains("data-id=\"up-magenta\""), "{dom}");
    assert!(!dom.contains("data-id=\"enh-cyan\""), "{dom}");
    let error = String::from_utf8_lossy(
        &pixbatch(dir.path())
            .args(["show", "bad-yellow", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let error: serde_json::Value = serde_json::from_str(&error).unwrap();
    let error = error["row"]["error"].as_str().unwrap().to_string();
    assert!(
        dom.contains(&html_text(&error)),
        "the error is not shown: {error}"
    );
    for label in ["created", "started", "finished", "took"] {
        assert!(
            dom.contains(&format!("<dt>{label}</dt>")),
            "no {label} in the card"
        );
    }
    for option in [
        "value=\"done\"",
        "value=\"failed\"",
        "value=\"photio\"",
        "value=\"topaz\"",
    ] {
        assert!(dom.contains(option), "no filter option {option}");
    }
}

/// How the DOM dump spells `s` inside an element.
fn html_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// While a run holds the database, the report comes over its control socket, with
/// previews of the inputs already there.
#[test]
fn html_report_works_while_a_run_is_going_on() {
    let sim = Sim::start(&["--task-ms", "5000"]);
    let dir = tempfile::tempdir().unwrap();
    for (i, c) in [MAGENTA, CYAN, YELLOW].into_iter().enumerate() {
        solid_png(&dir.path().join(format!("in{i}.png")), 40, 40, c);
    }
    std::fs::write(
        dir.path().join("jobs.csv"),
        "id,provider,operation,input,prompt,params\n\
         live0,topaz,enhance,in0.png,,\n\
         live1,topaz,enhance,in1.png,,\n\
         live2,topaz,enhance,in2.png,,\n",
    )
    .unwrap();
    let mut cmd = pixbatch(dir.path());
    sim.env(&mut cmd);
    let mut run = cmd
        .args(["run", "jobs.csv"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = pixbatch(dir.path())
            .args(["status", "--json"])
            .output()
            .unwrap();
        let s: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        if s.is_some_and(|s| !s["running"].is_null() && s["total"] == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "the run never showed up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let page = html_report(dir.path(), "live.html");
    assert!(
        run.try_wait().unwrap().is_none(),
        "the run ended before the report: the test proves nothing"
    );
    let start = page
        .find("<script id=\"jobs-data\" type=\"application/json\">")
        .unwrap();
    let rest = &page[start..];
    let json = &rest[rest.find('>').unwrap() + 1..rest.find("</script>").unwrap()];
    let jobs: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    assert_eq!(jobs.len(), 3);
    for j in &jobs {
        assert_ne!(j["state"], "done", "{j}");
        assert!(
            j["inputs"][0]["src"]
                .as_str()
                .is_some_and(|s| s.starts_with("data:image/")),
            "{j}"
        );
    }
    let _ = run.kill();
    let _ = run.wait();
}

/// The areas of colour `rgb` as 4-connected regions of at least `min` pixels
/// (previews stacked in a column stay apart, unlike [`blobs`]).
fn regions(img: &image::RgbImage, rgb: [u8; 3], min: u32) -> Vec<Blob> {
    let (w, h) = img.dimensions();
    let near = |x: u32, y: u32| {
        img.get_pixel(x, y)
            .0
            .iter()
            .zip(rgb)
            .all(|(a, b)| a.abs_diff(b) <= TOLERANCE)
    };
    let mut seen = vec![false; (w * h) as usize];
    let mut out = Vec::new();
    for y0 in 0..h {
        for x0 in 0..w {
            if seen[(y0 * w + x0) as usize] || !near(x0, y0) {
                continue;
            }
            seen[(y0 * w + x0) as usize] = true;
            let mut b = Blob {
                x0,
                x1: x0,
                y0,
                y1: y0,
                pixels: 0,
            };
            let mut stack = vec![(x0, y0)];
            while let Some((x, y)) = stack.pop() {
                b.pixels += 1;
                b.x0 = b.x0.min(x);
                b.x1 = b.x1.max(x);
                b.y0 = b.y0.min(y);
                b.y1 = b.y1.max(y);
                let mut push = |nx: u32, ny: u32| {
                    let i = (ny * w + nx) as usize;
                    if !seen[i] && near(nx, ny) {
                        seen[i] = true;
                        stack.push((nx, ny));
                    }
                };
                if x > 0 {
                    push(x - 1, y);
                }
                if x + 1 < w {
                    push(x + 1, y);
                }
                if y > 0 {
                    push(x, y - 1);
                }
                if y + 1 < h {
                    push(x, y + 1);
                }
            }
            if b.pixels >= min {
                out.push(b);
            }
        }
    }
    out
}

/// The `data-id`s of the tiles in a DOM dump, in page order.
fn tile_ids(dom: &str) -> Vec<String> {
    dom.split("<article class=\"tile ")
        .skip(1)
        .filter_map(|t| {
            let rest = &t[t.find("data-id=\"")? + 9..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// A report of 1,100 jobs: a dense grid (dozens of previews on one screen at
/// 1400 px), whole tiles two abreast at 420 px, the failures one click away, and
/// the sorts by state, provider, duration and error.
#[test]
fn html_report_of_a_thousand_jobs_is_a_dense_grid_at_1400_and_420_px() {
    let Some(browser) = browser_or_skip("html_report_of_a_thousand_jobs_is_a_dense_grid") else {
        return;
    };
    let sim = Sim::start(&["--task-ms", "1", "--no-limits"]);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    solid_png(&d.join("magenta.png"), 48, 40, MAGENTA);
    solid_png(&d.join("yellow.png"), 48, 40, YELLOW);
    let mut csv = String::from("id,provider,operation,input,prompt,params\n");
    let mut failing = 0;
    for i in 0..1100 {
        if i % 37 == 5 {
            failing += 1;
            csv.push_str(&format!(
                "f-{i:04},aithriving,img2img,yellow.png,sim-nsfw,\"{{\"\"width\"\":320,\"\"height\"\":320}}\"\n"
            ));
        } else {
            csv.push_str(&format!("a-{i:04},photio,upscale,magenta.png,,\n"));
        }
    }
    std::fs::write(d.join("jobs.csv"), csv).unwrap();
    let mut toml = String::new();
    for p in ["photio", "aithriving"] {
        toml.push_str(&format!(
            "[providers.{p}]\nrate_limits = []\nconcurrency = 16\n"
        ));
    }
    std::fs::write(d.join("pixbatch.toml"), toml).unwrap();
    let mut cmd = pixbatch(d);
    sim.env(&mut cmd);
    cmd.args(["run", "--quiet", "jobs.csv"]);
    let out = run_to_end(cmd, Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let rows = report(d, &d.join("pixbatch.db"));
    assert_eq!(rows.len(), 1100);
    let page = html_report(d, "grid.html");
    let url = url::Url::from_file_path(d.join("grid.html"))
        .unwrap()
        .to_string();
    let keep = |shot: &image::RgbImage, name: &str| {
        let kept = std::env::temp_dir().join(format!("pixbatch-report-{name}.png"));
        shot.save(&kept).unwrap();
        kept
    };

    // 1400 px: every done tile shows a magenta input and a magenta output.
    let wide = screenshot_at(&browser, d, &url, 1400, 900);
    let kept = keep(&wide, "grid-1400");
    let pics = regions(&wide, MAGENTA, 30 * 30);
    assert!(
        pics.len() >= 60,
        "{} previews on a 1400×900 screen (want dozens of jobs); see {}",
        pics.len(),
        kept.display()
    );

    // 420 px: whole tiles (no preview cut by the edge), two abreast.
    let narrow = screenshot_at(&browser, d, &url, 420, 900);
    let kept = keep(&narrow, "grid-420");
    let pics = regions(&narrow, MAGENTA, 30 * 30);
    assert!(pics.len() >= 8, "{pics:?}; see {}", kept.display());
    for b in &pics {
        assert!(
            b.x1 < 416 && b.x1 - b.x0 >= 44,
            "a preview cut at the edge: {b:?}; see {}",
            kept.display()
        );
    }
    let first_row: Vec<&Blob> = pics
        .iter()
        .filter(|b| b.y0 <= pics[0].y1 && pics[0].y0 <= b.y1)
        .collect();
    assert_eq!(
        first_row.len(),
        4,
        "two tiles (input and output each) per row at 420 px: {first_row:?}; see {}",
        kept.display()
    );

    // The failures, one click away: the button sets #state=failed&sort=error.
    assert!(page.contains("failures"), "no failures button");
    let dom = dump_dom(&browser, d, &url);
    assert!(
        dom.contains(&format!("Show the {failing} failed")),
        "no one-click failures button"
    );
    let failed_url = format!("{url}#state=failed&sort=error");
    let failed = screenshot_at(&browser, d, &failed_url, 1400, 900);
    let kept = keep(&failed, "grid-failed-1400");
    assert!(
        regions(&failed, YELLOW, 30 * 30).len() >= 8,
        "see {}",
        kept.display()
    );
    assert!(
        regions(&failed, MAGENTA, 30 * 30).is_empty(),
        "a done job among the failures; see {}",
        kept.display()
    );
    let ids = tile_ids(&dump_dom(&browser, d, &failed_url));
    assert_eq!(ids.len(), failing);
    assert!(ids.iter().all(|id| id.starts_with("f-")), "{ids:?}");

    // Sorts: by state (failures first), provider, duration (longest first).
    let by_id: std::collections::HashMap<String, &serde_json::Value> = rows
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r))
        .collect();
    let ids = tile_ids(&dump_dom(&browser, d, &format!("{url}#sort=state")));
    assert_eq!(ids.len(), 200, "a page of tiles");
    assert!(
        ids[..failing].iter().all(|id| id.starts_with("f-")),
        "{ids:?}"
    );
    let ids = tile_ids(&dump_dom(&browser, d, &format!("{url}#sort=provider")));
    let providers: Vec<&str> = ids
        .iter()
        .map(|id| by_id[id]["provider"].as_str().unwrap())
        .collect();
    assert!(providers.windows(2).all(|w| w[0] <= w[1]), "{providers:?}");
    let ids = tile_ids(&dump_dom(&browser, d, &format!("{url}#sort=duration")));
    let took: Vec<f64> = ids
        .iter()
        .map(|id| by_id[id]["duration_s"].as_f64().unwrap())
        .collect();
    assert!(took.windows(2).all(|w| w[0] >= w[1]), "{took:?}");
    let ids = tile_ids(&dump_dom(&browser, d, &format!("{url}#sort=error")));
    assert!(
        ids[..failing].iter().all(|id| id.starts_with("f-")),
        "{ids:?}"
    );

    // Pixel sizes on the tiles (the output's, from the record).
    let px = rows
        .iter()
        .find(|r| r["state"] == "done")
        .map(|r| r["pixels"][0].as_str().unwrap().replace('x', "×"))
        .unwrap();
    assert!(dom.contains(&format!("{px} px")), "no {px} px on the tiles");
}
