//! Deterministic image work for the simulator: probing, decoding with limits, resizing,
//! tinting, generating pictures, encoding.
//!
//! Everything here is a pure function of its arguments, so the same input bytes and
//! parameters always give the same output bytes (tests compare SHA-256). Nothing here
//! panics on bad input: every failure is a `String` reason for the caller to wrap in the
//! provider's error shape.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::imageops::{self, FilterType};
use image::{
    DynamicImage, ExtendedColorType, ImageEncoder, ImageFormat, ImageReader, Rgba, RgbaImage,
};
use sha2::{Digest, Sha256};

/// The two formats the simulator decodes and encodes (the crate is built with the `png`
/// and `jpeg` features of `image` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Png => "image/png",
            Format::Jpeg => "image/jpeg",
        }
    }

    /// The short name providers echo back (`png`, `jpeg`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Jpeg => "jpeg",
        }
    }
}

/// What a header read tells about an image, without decoding its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

impl Probe {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// How a picture is fitted into a target size of a different aspect ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Scale both axes independently to exactly the target size.
    Stretch,
    /// Scale to fit inside, pad with black bars (Topaz's default).
    Letterbox,
    /// Scale to cover, cut the overhang evenly on both sides (Topaz `crop_to_fill`).
    Crop,
}

/// Read the format and the dimensions from the header only.
pub fn probe(bytes: &[u8]) -> Result<Probe, String> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("could not read the image: {e}"))?;
    let format = match reader.format() {
        Some(ImageFormat::Png) => Format::Png,
        Some(ImageFormat::Jpeg) => Format::Jpeg,
        Some(other) => return Err(format!("unsupported image format {other:?}")),
        None => return Err("unrecognised image data".to_string()),
    };
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| format!("could not read the image header: {e}"))?;
    Ok(Probe {
        format,
        width,
        height,
    })
}

/// Decode the pixels, refusing anything above `max_pixels` before allocating for it.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
    let p = probe(bytes)?;
    if p.width == 0 || p.height == 0 {
        return Err("image has a zero dimension".to_string());
    }
    if p.pixels() > max_pixels {
        return Err(format!(
            "image of {}x{} exceeds the limit of {} pixels",
            p.width, p.height, max_pixels
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("could not read the image: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(p.width);
    limits.max_image_height = Some(p.height);
    // RGBA16 of the image plus decoder scratch space.
    limits.max_alloc = Some(p.pixels().saturating_mul(16).max(1 << 20));
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| format!("could not decode the image: {e}"))
}

/// Resize `img` to exactly `w` x `h` with the given fit (Triangle filter).
pub fn fit(img: &DynamicImage, w: u32, h: u32, how: Fit) -> RgbaImage {
    let w = w.max(1);
    let h = h.max(1);
    let src = img.to_rgba8();
    let (sw, sh) = (src.width().max(1), src.height().max(1));
    match how {
        Fit::Stretch => imageops::resize(&src, w, h, FilterType::Triangle),
        Fit::Letterbox => {
            let scale = (f64::from(w) / f64::from(sw)).min(f64::from(h) / f64::from(sh));
            let iw = scaled(sw, scale).min(w);
            let ih = scaled(sh, scale).min(h);
            if (iw, ih) == (w, h) {
                return imageops::resize(&src, w, h, FilterType::Triangle);
            }
            let inner = imageops::resize(&src, iw, ih, FilterType::Triangle);
            let mut canvas = RgbaImage::from_pixel(w, h, Rgba([0, 0, 0, 255]));
            imageops::overlay(
                &mut canvas,
                &inner,
                i64::from((w - iw) / 2),
                i64::from((h - ih) / 2),
            );
            canvas
        }
        Fit::Crop => {
            let scale = (f64::from(w) / f64::from(sw)).max(f64::from(h) / f64::from(sh));
            let cw = scaled(sw, scale).max(w);
            let ch = scaled(sh, scale).max(h);
            let covered = imageops::resize(&src, cw, ch, FilterType::Triangle);
            imageops::crop_imm(&covered, (cw - w) / 2, (ch - h) / 2, w, h).to_image()
        }
    }
}

fn scaled(dim: u32, scale: f64) -> u32 {
    let v = (f64::from(dim) * scale).round();
    if v < 1.0 {
        1
    } else if v > f64::from(u32::MAX) {
        u32::MAX
    } else {
        v as u32
    }
}

/// Blend every pixel towards `rgb` by `amount` (0 = unchanged, 1 = flat colour).
pub fn tint(img: &mut RgbaImage, rgb: [u8; 3], amount: f64) {
    let a = amount.clamp(0.0, 1.0);
    for px in img.pixels_mut() {
        for (c, t) in px.0.iter_mut().zip(rgb) {
            let v = f64::from(*c) * (1.0 - a) + f64::from(t) * a;
            *c = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// A deterministic picture made from `seed` alone (for text-to-image style operations and
/// test fixtures): a diagonal two-colour gradient with a grid of soft discs.
pub fn generate(w: u32, h: u32, seed: u64) -> RgbaImage {
    let d = Sha256::digest(seed.to_le_bytes());
    let c0 = [d[0], d[1], d[2]];
    let c1 = [d[3], d[4], d[5]];
    let disc = [d[6], d[7], d[8]];
    let cell = 8 + u32::from(d[9] % 24);
    let (w, h) = (w.max(1), h.max(1));
    RgbaImage::from_fn(w, h, |x, y| {
        let t = (f64::from(x) / f64::from(w) + f64::from(y) / f64::from(h)) / 2.0;
        let mut px = [0u8; 4];
        for i in 0..3 {
            px[i] = (f64::from(c0[i]) * (1.0 - t) + f64::from(c1[i]) * t).round() as u8;
        }
        let (cx, cy) = (x % cell, y % cell);
        let r = f64::from(cell) / 2.0;
        let dist = ((f64::from(cx) - r).powi(2) + (f64::from(cy) - r).powi(2)).sqrt();
        if dist < r * 0.6 {
            for i in 0..3 {
                px[i] = ((u16::from(px[i]) + u16::from(disc[i])) / 2) as u8;
            }
        }
        px[3] = 255;
        Rgba(px)
    })
}

/// Encode RGBA pixels. JPEG drops the alpha channel (quality 90); PNG keeps it only when
/// some pixel is not opaque.
pub fn encode(img: &RgbaImage, format: Format) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let (w, h) = img.dimensions();
    match format {
        Format::Jpeg => {
            let rgb = DynamicImage::ImageRgba8(img.clone()).to_rgb8();
            JpegEncoder::new_with_quality(&mut out, 90)
                .encode(rgb.as_raw(), w, h, ExtendedColorType::Rgb8)
                .map_err(|e| format!("could not encode jpeg: {e}"))?;
        }
        Format::Png => {
            let opaque = img.pixels().all(|p| p.0[3] == 255);
            let enc = PngEncoder::new(&mut out);
            if opaque {
                let rgb = DynamicImage::ImageRgba8(img.clone()).to_rgb8();
                enc.write_image(rgb.as_raw(), w, h, ExtendedColorType::Rgb8)
            } else {
                enc.write_image(img.as_raw(), w, h, ExtendedColorType::Rgba8)
            }
            .map_err(|e| format!("could not encode png: {e}"))?;
        }
    }
    Ok(out)
}

/// Pads an encoded image to at least `min_len` bytes with data every decoder skips:
/// a private ancillary PNG chunk before `IEND`, or JPEG comment segments after `SOI`.
/// For benchmarks of large downloads without the cost of making large pictures.
pub fn pad_to(mut bytes: Vec<u8>, format: Format, min_len: usize) -> Vec<u8> {
    if bytes.len() >= min_len {
        return bytes;
    }
    match format {
        Format::Png => {
            // The last 12 bytes are the IEND chunk.
            let Some(iend_at) = bytes.len().checked_sub(12) else {
                return bytes;
            };
            let data_len = (min_len - bytes.len()).saturating_sub(12).max(1);
            let Ok(len32) = u32::try_from(data_len) else {
                return bytes;
            };
            let iend = bytes.split_off(iend_at);
            bytes.reserve(data_len + 24);
            bytes.extend_from_slice(&len32.to_be_bytes());
            let body_at = bytes.len();
            // "pxPd": lower-case first letter = ancillary (safe to ignore), second =
            // private.
            bytes.extend_from_slice(b"pxPd");
            bytes.resize(bytes.len() + data_len, 0);
            let crc = crc32fast::hash(&bytes[body_at..]);
            bytes.extend_from_slice(&crc.to_be_bytes());
            bytes.extend_from_slice(&iend);
            bytes
        }
        Format::Jpeg => {
            const MAX_SEGMENT: usize = 65_533;
            let mut missing = min_len - bytes.len();
            let mut pad = Vec::with_capacity(missing + 4 * (missing / MAX_SEGMENT + 1));
            while missing > 0 {
                let n = missing.saturating_sub(4).clamp(1, MAX_SEGMENT);
                pad.extend_from_slice(&[0xFF, 0xFE]);
                pad.extend_from_slice(&((n + 2) as u16).to_be_bytes());
                pad.resize(pad.len() + n, b' ');
                missing = missing.saturating_sub(n + 4);
            }
            // After SOI (2 bytes).
            let tail = bytes.split_off(2.min(bytes.len()));
            bytes.extend_from_slice(&pad);
            bytes.extend_from_slice(&tail);
            bytes
        }
    }
}

/// A test fixture: a generated PNG of the given size.
pub fn sample_png(w: u32, h: u32, seed: u64) -> Vec<u8> {
    encode(&generate(w, h, seed), Format::Png).unwrap_or_default()
}

/// A test fixture: a generated JPEG of the given size.
pub fn sample_jpeg(w: u32, h: u32, seed: u64) -> Vec<u8> {
    encode(&generate(w, h, seed), Format::Jpeg).unwrap_or_default()
}

/// Lower-case hex SHA-256, the form the ledger uses.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_images_still_decode_to_the_same_pixels() {
        for format in [Format::Png, Format::Jpeg] {
            let plain = encode(&generate(40, 30, 7), format).unwrap();
            let padded = pad_to(plain.clone(), format, 300_000);
            assert!(padded.len() >= 300_000, "{format:?}: {}", padded.len());
            assert!(padded.len() < 300_000 + 300, "{format:?}: {}", padded.len());
            let a = decode(&plain, 1 << 20).unwrap();
            let b = decode(&padded, 1 << 20).unwrap();
            assert_eq!(a.to_rgba8(), b.to_rgba8(), "{format:?}");
            assert_eq!(pad_to(plain.clone(), format, 10), plain);
        }
    }

    #[test]
    fn probe_and_decode_round_trip() {
        let png = sample_png(40, 30, 7);
        let p = probe(&png).unwrap();
        assert_eq!((p.format, p.width, p.height), (Format::Png, 40, 30));
        let jpg = sample_jpeg(40, 30, 7);
        assert_eq!(probe(&jpg).unwrap().format, Format::Jpeg);
        assert!(decode(&png, 40 * 30).is_ok());
        assert!(decode(&png, 40 * 30 - 1).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            &b""[..],
            b"hello",
            b"\x89PNG\r\n\x1a\n\0\0",
            b"\xff\xd8\xff\xe0garbage",
        ] {
            assert!(decode(bad, 1 << 20).is_err());
        }
        let mut png = sample_png(20, 20, 1);
        png.truncate(png.len() / 2);
        assert!(decode(&png, 1 << 20).is_err());
    }

    #[test]
    fn fits_give_exact_sizes_and_are_deterministic() {
        let img = decode(&sample_png(50, 20, 3), 1 << 20).unwrap();
        for how in [Fit::Stretch, Fit::Letterbox, Fit::Crop] {
            for (w, h) in [(100, 40), (30, 30), (1, 1), (7, 90)] {
                let a = fit(&img, w, h, how);
                assert_eq!(a.dimensions(), (w, h), "{how:?}");
                let b = fit(&img, w, h, how);
                assert_eq!(
                    encode(&a, Format::Jpeg).unwrap(),
                    encode(&b, Format::Jpeg).unwrap()
                );
            }
        }
    }

    #[test]
    fn tint_moves_towards_the_colour() {
        let mut img = RgbaImage::from_pixel(2, 2, Rgba([0, 0, 0, 255]));
        tint(&mut img, [200, 100, 0], 0.5);
        assert_eq!(img.get_pixel(0, 0).0, [100, 50, 0, 255]);
    }
}
