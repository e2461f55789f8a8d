//! The material of `pixbatch demo`: the example manifest (embedded from
//! `jobs.example.csv`) and its input pictures (drawn here, deterministically, and
//! also committed under `examples/images/` so the manifest works from the repo).

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

/// The example manifest, as committed at the repository root.
/// Where `pixbatch demo` writes its manifest, pictures and database (`./pixbatch-demo`).
pub const FOLDER: &str = "pixbatch-demo";

pub const EXAMPLE_MANIFEST: &str = include_str!("../jobs.example.csv");

/// (file name, width, height) of the example inputs. The extension sets the format
/// (Perfect's hairstyles take JPEG only); a name with `mask` is a white blob on
/// black, the shape Perfect's object removal expects, the size of its image.
pub const EXAMPLE_IMAGES: [(&str, u32, u32); 6] = [
    ("portrait.png", 96, 128),
    ("landscape.png", 160, 96),
    ("square.png", 128, 128),
    ("tiny.png", 64, 48),
    ("portrait.jpg", 96, 128),
    ("landscape-mask.png", 160, 96),
];

/// Draws example picture `name`: a gradient with a few shapes, different per name.
pub fn example_image(name: &str, width: u32, height: u32) -> RgbImage {
    let seed = name
        .bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    let (cx, cy) = (width as i64 / 2, height as i64 / 2);
    let r2 = (width.min(height) as i64 / 3).pow(2);
    RgbImage::from_fn(width, height, |x, y| {
        let (xi, yi) = (x as i64, y as i64);
        let d2 = (xi - cx).pow(2) + (yi - cy).pow(2);
        let base = [
            ((x * 255) / width.max(1)) as u8,
            ((y * 255) / height.max(1)) as u8,
            (seed % 256) as u8,
        ];
        if d2 < r2 {
            Rgb([255 - base[0], base[2], 255 - base[1]])
        } else if (x / 16 + y / 16) % 2 == 0 {
            Rgb([base[0] / 2 + 60, base[1] / 2 + 40, base[2]])
        } else {
            Rgb(base)
        }
    })
}

/// A mask: white where the object to remove is (an ellipse right of centre).
fn example_mask(width: u32, height: u32) -> image::GrayImage {
    let (cx, cy) = (width as f64 * 0.65, height as f64 * 0.5);
    let (rx, ry) = (width as f64 * 0.15, height as f64 * 0.25);
    image::GrayImage::from_fn(width, height, |x, y| {
        let (dx, dy) = ((x as f64 - cx) / rx, (y as f64 - cy) / ry);
        image::Luma([if dx * dx + dy * dy <= 1.0 { 255 } else { 0 }])
    })
}

/// The file bytes of example picture `name`, in the format its extension names.
pub fn example_file(name: &str, width: u32, height: u32) -> Result<Vec<u8>, image::ImageError> {
    let mut out = std::io::Cursor::new(Vec::new());
    let format = if name.ends_with(".jpg") {
        image::ImageFormat::Jpeg
    } else {
        image::ImageFormat::Png
    };
    if name.contains("mask") {
        example_mask(width, height).write_to(&mut out, format)?;
    } else {
        // The picture is named by its stem, so portrait.png and portrait.jpg agree.
        let stem = name.rsplit_once('.').map_or(name, |(s, _)| s);
        let stem = if stem == "portrait" {
            "portrait.png"
        } else {
            name
        };
        example_image(stem, width, height).write_to(&mut out, format)?;
    }
    Ok(out.into_inner())
}

/// Writes the manifest and its pictures under `folder` (kept if already there, so
/// re-running the demo resumes the same jobs); returns the manifest's path.
pub fn materialize(folder: &Path) -> std::io::Result<PathBuf> {
    let images = folder.join("examples").join("images");
    std::fs::create_dir_all(&images)?;
    for (name, w, h) in EXAMPLE_IMAGES {
        let path = images.join(name);
        let bytes = example_file(name, w, h).map_err(std::io::Error::other)?;
        if std::fs::read(&path).ok().as_deref() != Some(bytes.as_slice()) {
            std::fs::write(&path, bytes)?;
        }
    }
    let manifest = folder.join("jobs.example.csv");
    if std::fs::read_to_string(&manifest).ok().as_deref() != Some(EXAMPLE_MANIFEST) {
        std::fs::write(&manifest, EXAMPLE_MANIFEST)?;
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_example_images_match_the_generator() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/images");
        for (name, w, h) in EXAMPLE_IMAGES {
            let committed = std::fs::read(dir.join(name)).unwrap();
            assert_eq!(
                committed,
                example_file(name, w, h).unwrap(),
                "{name} differs: regenerate it with `pixbatch demo`"
            );
        }
    }
}
