use std::time::Duration;

use crate::common::*;

/// `pixbatch demo` from an empty folder: every job done, every output an image of
/// the size its row asks for.
#[test]
fn demo_finishes_and_every_output_is_an_image_of_the_expected_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_to_end(
        {
            let mut c = pixbatch(dir.path());
            c.arg("demo");
            c
        },
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // (job id, expected width, height): from the rows' params; where only one side
    // is given the other follows the input's aspect ratio.
    let expected = [
        ("topaz-portrait-standard", 192, 256),
        ("topaz-landscape-hifi", 320, 192),
        ("topaz-square-cgi", 256, 256),
        ("topaz-tiny-lowres", 256, 192),
        ("topaz-square-text", 200, 200),
        ("topaz-portrait-sync", 144, 192),
        ("topaz-lake-redefine", 320, 192),
        ("topaz-tiny-recovery", 128, 96),
        ("topaz-square-gallery", 160, 160),
        ("photio-portrait-x2", 192, 256),
        ("photio-tiny-x4", 256, 192),
        ("aithriving-square-anime", 512, 512),
        ("aithriving-landscape-oil", 640, 384),
        ("aithriving-portrait-studio", 384, 512),
    ];
    let rows = report(dir.path(), &dir.path().join("pixbatch-demo/pixbatch.db"));
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for (id, w, h) in expected {
        let row = rows
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no row {id}"));
        assert_eq!(row["state"], "done", "{id}: {row}");
        let path = dir
            .path()
            .join("out")
            .join(row["outputs"].as_str().unwrap());
        let img = image::open(&path).unwrap_or_else(|e| panic!("{id}: {}: {e}", path.display()));
        assert_eq!((img.width(), img.height()), (w, h), "{id}");
        assert_eq!(sha256_file(&path), row["sha256"].as_str().unwrap(), "{id}");
    }
    assert!(dir
        .path()
        .join("out/gallery/topaz-square-gallery.jpg")
        .is_file());
    assert!(dir.path().join("out/sync/portrait-large.jpg").is_file());
    assert!(files_ending(&dir.path().join("out"), ".part").is_empty());

    // Running the demo again does nothing new: every job is already done.
    let again = run_to_end(
        {
            let mut c = pixbatch(dir.path());
            c.arg("demo");
            c
        },
        Duration::from_secs(60),
    );
    assert_eq!(again.status.code(), Some(0), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("(0 finished by this run)"),
        "{}",
        text(&again)
    );
}
