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

    // (job id, expected width, height, files): from the rows' params; where only one
    // side is given the other follows the input's aspect ratio; edits keep the
    // input's size; Perfect's aging gives four ages, Dzine one file per slot.
    let expected = [
        ("topaz-portrait-standard", 192, 256, 1),
        ("topaz-landscape-hifi", 320, 192, 1),
        ("topaz-square-cgi", 256, 256, 1),
        ("topaz-tiny-lowres", 256, 192, 1),
        ("topaz-square-text", 200, 200, 1),
        ("topaz-portrait-sync", 144, 192, 1),
        ("topaz-lake-redefine", 320, 192, 1),
        ("topaz-tiny-recovery", 128, 96, 1),
        ("topaz-square-gallery", 160, 160, 1),
        ("topaz-portrait-wonder", 192, 256, 1),
        ("topaz-landscape-sharpen", 160, 96, 1),
        ("topaz-tiny-sharpen-sync", 64, 48, 1),
        ("topaz-portrait-focus", 96, 128, 1),
        ("topaz-tiny-denoise", 64, 48, 1),
        ("topaz-portrait-denoise-sync", 96, 128, 1),
        ("topaz-square-restore", 128, 128, 1),
        ("topaz-landscape-light", 160, 96, 1),
        ("topaz-square-balance-sync", 128, 128, 1),
        ("photio-portrait-x2", 192, 256, 1),
        ("photio-tiny-x4", 256, 192, 1),
        ("aithriving-square-anime", 512, 512, 1),
        ("aithriving-landscape-oil", 640, 384, 1),
        ("aithriving-portrait-studio", 384, 512, 1),
        ("perfect-hair-short", 96, 128, 1),
        ("perfect-makeup", 96, 128, 1),
        ("perfect-erase", 160, 96, 1),
        ("perfect-enhance-x2", 320, 192, 1),
        ("perfect-cutout", 128, 128, 1),
        ("perfect-aging", 96, 128, 4),
        ("perfect-lighthouse", 512, 512, 1),
        ("dzine-lighthouse", 512, 512, 2),
        ("dzine-watercolor", 160, 96, 1),
        ("dzine-swap", 128, 128, 1),
        ("dzine-upscale", 128, 96, 1),
    ];
    let rows = report(dir.path(), &dir.path().join("pixbatch-demo/pixbatch.db"));
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    for (id, w, h, files) in expected {
        let row = rows
            .iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no row {id}"));
        assert_eq!(row["state"], "done", "{id}: {row}");
        let (outputs, hashes) = (joined(&row["outputs"]), joined(&row["sha256"]));
        let outputs: Vec<&str> = outputs.split('|').collect();
        let hashes: Vec<&str> = hashes.split('|').collect();
        assert_eq!(outputs.len(), files, "{id}: {row}");
        for (output, sha) in outputs.iter().zip(&hashes) {
            let path = dir.path().join("out").join(output);
            let img =
                image::open(&path).unwrap_or_else(|e| panic!("{id}: {}: {e}", path.display()));
            assert_eq!((img.width(), img.height()), (w, h), "{id}: {output}");
            assert_eq!(sha256_file(&path), *sha, "{id}");
        }
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
