//! Image preprocessing driven by `preprocessor_config.json`.
//!
//! Reproduces what Python `transformers` does with `CLIPImageProcessor` and `LlavaImageProcessor`
//! on its PIL/NumPy path, step for step and with the same arithmetic:
//!
//! 1. convert to RGB (alpha is composited onto white with Pillow's integer formula),
//! 2. `do_pad`: pad to a square with the background colour `int(mean * 255)` (LLaVA-1.5),
//! 3. `do_resize`: Pillow's separable resampler (`ImagingResample`) re-implemented bit for bit:
//!    the same coefficients, the same 22-bit fixed point, 8-bit rounding between the passes and
//!    Pillow 13's choice of which pass comes first (see [`pil_resize`]),
//! 4. `do_center_crop` (zero padded where the image is smaller than the crop),
//! 5. `do_rescale` (`f64` product, then `f32`) and `do_normalize` (`f32`).
//!
//! The output is a `f32` tensor `[3, H, W]` on the CPU. Decoding ([`load_image`], [`decode_image`])
//! turns an image upright by its EXIF orientation tag first, as `transformers`' `load_image` does.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{
    metadata::Orientation, DynamicImage, ExtendedColorType, ImageDecoder, ImageReader, Limits,
};
use serde_json::Value;

/// The largest image (in pixels, width × height) that [`load_image`] decodes: Pillow's own
/// limit (`Image.MAX_IMAGE_PIXELS` × 2, where it refuses a "decompression bomb"), so every
/// photograph `transformers` opens (a 108 Mpixel phone's among them) opens here too.
pub const MAX_IMAGE_PIXELS: u64 = 2 * (1024 * 1024 * 1024 / 4 / 3);

/// The longest side (in pixels) that [`load_image`] accepts.
pub const MAX_IMAGE_SIDE: u32 = 32_768;

/// The longest side (in pixels) of a processed image: sizes in image processor and model configs
/// and the output of a resize are checked against it before anything is allocated.
pub const MAX_PROCESSED_SIDE: usize = 8192;

/// The formats [`load_image`] can decode (the `image` crate features this crate enables).
pub const SUPPORTED_IMAGE_FORMATS: &str =
    "PNG, JPEG, WebP, GIF (its first frame), BMP, TIFF (its first page)";

/// How much of a file tells its format ([`image_format`]; an SVG's `<svg` may follow an XML
/// declaration and a comment).
const FORMAT_HEAD_BYTES: u64 = 256;

/// The CLIP mean that `transformers` uses as the class default (`OPENAI_CLIP_MEAN`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// The CLIP standard deviation that `transformers` uses as the class default (`OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Reads an image file, refusing (with an error, never a panic) missing files, files that are not
/// images in a supported format, and images larger than [`MAX_IMAGE_PIXELS`] or
/// [`MAX_IMAGE_SIDE`]. An EXIF orientation tag (JPEG, PNG, WebP, TIFF) is applied, as
/// `transformers`' `load_image` applies it (not one that only XMP or ImageMagick's "Raw profile
/// type exif" text holds, which Pillow also reads).
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = read_image_file(path)?;
    decode_image(&bytes, &path.display().to_string(), MAX_IMAGE_PIXELS)
}

/// The bytes of an image file, with the checks of [`load_image`] that come before the decode
/// (a regular file, a supported format): what [`decode_image`] decodes.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    crate::input::check_regular(path, "image file")?;
    use std::io::Read;
    let read_error = || format!("cannot read image file {}", path.display());
    let mut file = std::fs::File::open(path).with_context(read_error)?;
    // The format first, from the first bytes: a video or archive given by mistake is refused
    // before gigabytes of it are read.
    let mut bytes = Vec::new();
    (&mut file)
        .take(FORMAT_HEAD_BYTES)
        .read_to_end(&mut bytes)
        .with_context(read_error)?;
    image_format(&bytes, &path.display().to_string())?;
    // Room for the whole file at once (reading on would double the buffer as it grows).
    let size = file.metadata().with_context(read_error)?.len();
    let rest = usize::try_from(size.saturating_sub(bytes.len() as u64)).unwrap_or(usize::MAX);
    bytes.try_reserve_exact(rest).map_err(|_| {
        anyhow!(
            "not enough memory for reading image file {}: it is {} MB, more than the process \
             can take now (a limit such as ulimit -v, or the machine's memory); send a smaller \
             image",
            path.display(),
            size.div_ceil(1 << 20)
        )
    })?;
    file.read_to_end(&mut bytes).with_context(read_error)?;
    Ok(bytes)
}

/// The width and height of an image file from its header, with the checks of [`load_image`]
/// that need no decode (a regular file, a supported format, the size limits): what a data set's
/// images are checked with before a run starts; the header is read, not the pixels (a TIFF is
/// decoded: only its decoder knows whether it can read the file's compression).
pub fn image_file_size(path: &Path) -> Result<(u32, u32)> {
    crate::input::check_regular(path, "image file")?;
    let name = path.display().to_string();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read image file {name}"))?;
    let mut reader = std::io::BufReader::new(file);
    let mut head = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut reader, FORMAT_HEAD_BYTES),
        &mut head,
    )
    .with_context(|| format!("cannot read image file {name}"))?;
    let format = image_format(&head, &name)?;
    // A TIFF's compression is known only to its decoder (Pillow reads CCITT fax TIFFs, this one
    // does not): decoded whole, so such a file is refused here and not at its question.
    if format == image::ImageFormat::Tiff {
        let image = load_image(path)?;
        return Ok((image.width(), image.height()));
    }
    if format == image::ImageFormat::Png {
        check_png_profile(&mut reader, &name)?;
    }
    if format == image::ImageFormat::Jpeg {
        // The frame header follows the metadata segments (an EXIF block is up to 64 KiB).
        std::io::Seek::rewind(&mut reader)
            .with_context(|| format!("cannot read image file {name}"))?;
        let mut head = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut reader, 1 << 18), &mut head)
            .with_context(|| format!("cannot read image file {name}"))?;
        check_jpeg_frame(&head, &name)?;
    }
    std::io::Seek::rewind(&mut reader).with_context(|| format!("cannot read image file {name}"))?;
    let (width, height) = ImageReader::with_format(reader, format)
        .into_dimensions()
        .map_err(|e| describe_image_error(&name, e))?;
    check_image_size(&name, width, height, MAX_IMAGE_PIXELS)?;
    Ok((width, height))
}

/// The width and height of an image held in memory, from its header (nothing is decoded),
/// checked against [`MAX_IMAGE_SIDE`] and `max_pixels` (≤ [`MAX_IMAGE_PIXELS`]).
pub fn image_size(bytes: &[u8], name: &str, max_pixels: u64) -> Result<(u32, u32)> {
    let format = image_format(bytes, name)?;
    if format == image::ImageFormat::Png {
        check_png_profile(&mut std::io::Cursor::new(bytes), name)?;
    }
    if format == image::ImageFormat::Jpeg {
        check_jpeg_frame(bytes, name)?;
    }
    let (width, height) = ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| describe_image_error(name, e))?;
    check_image_size(name, width, height, max_pixels.min(MAX_IMAGE_PIXELS))?;
    // A GIF's first frame is decoded at its own size, which its header need not show.
    if let Some((w, h)) = (format == image::ImageFormat::Gif)
        .then(|| gif_frame_size(bytes))
        .flatten()
    {
        check_image_size(name, w, h, max_pixels.min(MAX_IMAGE_PIXELS))?;
    }
    Ok((width, height))
}

/// The width and height of the first frame of GIF data `b` (its first image descriptor, after
/// the screen descriptor, colour table and extensions); `None` where the data ends first.
fn gif_frame_size(b: &[u8]) -> Option<(u32, u32)> {
    let u16_at = |i: usize| {
        Some(u32::from(u16::from_le_bytes(
            b.get(i..i + 2)?.try_into().ok()?,
        )))
    };
    let packed = *b.get(10)?;
    let mut at = 13
        + if packed & 0x80 != 0 {
            3 << ((packed & 7) + 1)
        } else {
            0
        };
    loop {
        match *b.get(at)? {
            // An extension: its label, then sub-blocks up to an empty one.
            0x21 => {
                at += 2;
                loop {
                    let n = usize::from(*b.get(at)?);
                    at += 1 + n;
                    if n == 0 {
                        break;
                    }
                }
            }
            0x2C => return Some((u16_at(at + 5)?, u16_at(at + 7)?)),
            _ => return None,
        }
    }
}

/// What a decoder holds beside the pixels it returns (`width` × `height`, as its header says),
/// read from the data: a GIF whose first frame is not its screen decodes the frame into a buffer
/// of its own (4 bytes a pixel); a progressive JPEG keeps its coefficients (2 bytes a pixel for
/// each component) until its last scan, then makes each component's plane (1 byte a pixel):
/// measured 9.5–11.5 bytes a pixel in all for 4:4:4 RGB, counted 12; a TIFF is decoded into a
/// buffer of its own and then copied (CMYK: 4 samples a pixel, converted to 3); a WebP
/// ([`webp_scratch`]) into its own buffers.
fn decoder_scratch(b: &[u8], format: image::ImageFormat, decoder: &impl ImageDecoder) -> u64 {
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    match format {
        image::ImageFormat::WebP => {
            webp_scratch(b, decoder.dimensions(), decoder.color_type().has_alpha())
        }
        image::ImageFormat::Tiff => match decoder.original_color_type() {
            ExtendedColorType::Cmyk8 | ExtendedColorType::Cmyk16 => {
                decoder.total_bytes().saturating_mul(4) / 3
            }
            _ => decoder.total_bytes(),
        },
        image::ImageFormat::Gif => match gif_frame_size(b) {
            Some((w, h)) if (w, h) != (width, height) => u64::from(w) * u64::from(h) * 4,
            _ => 0,
        },
        image::ImageFormat::Jpeg => match jpeg_frame(b) {
            Some((0xC2, at)) => {
                let components = b.get(at + 9).copied().map_or(3, u64::from);
                pixels * components * 3
            }
            _ => 0,
        },
        _ => 0,
    }
}

/// What `image-webp` decodes into beside the pixels it returns, by the file's chunks: a lossy
/// image's compressed data (read whole), its Y, U and V planes (1.5 bytes a pixel of its
/// 16-pixel macroblocks) and, with an alpha chunk, that chunk's lossless decoding (4 bytes a
/// pixel) and plane (1); a lossless image without alpha its RGBA (4 bytes a pixel, copied to
/// RGB); an animation's first frame and its canvas (RGBA each).
fn webp_scratch(b: &[u8], (width, height): (u32, u32), alpha: bool) -> u64 {
    let pixels = u64::from(width) * u64::from(height);
    let (mut lossy, mut lossless, mut alpha_chunk, mut animated) = (None, false, false, false);
    let mut at: usize = 12;
    while let Some(header) = b.get(at..at.saturating_add(8)) {
        let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        match &header[..4] {
            b"VP8 " => lossy = Some(size as u64),
            b"VP8L" => lossless = true,
            b"ALPH" => alpha_chunk = true,
            b"ANIM" | b"ANMF" => animated = true,
            _ => {}
        }
        at = at
            .saturating_add(8)
            .saturating_add(size)
            .saturating_add(size & 1);
    }
    if animated {
        pixels.saturating_mul(8)
    } else if let Some(compressed) = lossy {
        let blocks = u64::from(width.div_ceil(16)) * u64::from(height.div_ceil(16)) * 256;
        let planes = blocks.saturating_mul(3) / 2;
        let alpha = if alpha_chunk {
            pixels.saturating_mul(5)
        } else {
            0
        };
        planes.saturating_add(compressed).saturating_add(alpha)
    } else if lossless && !alpha {
        pixels.saturating_mul(4)
    } else {
        0
    }
}

/// The checks of [`image_file_size`] (with `decode`, of [`load_image`]) on an image held in
/// memory (one embedded in a data file), named `name` in errors; its format.
pub fn check_image_bytes(bytes: &[u8], name: &str, decode: bool) -> Result<image::ImageFormat> {
    let format = image_format(bytes, name)?;
    // A TIFF is decoded whole, as by `image_file_size`: only its decoder knows its compression.
    if decode || format == image::ImageFormat::Tiff {
        decode_image(bytes, name, MAX_IMAGE_PIXELS)?;
    } else {
        image_size(bytes, name, MAX_IMAGE_PIXELS)?;
    }
    Ok(format)
}

fn image_format(bytes: &[u8], name: &str) -> Result<image::ImageFormat> {
    if bytes.is_empty() {
        bail!("image {name} is empty (0 bytes)");
    }
    if let Some(kind) = other_format(bytes) {
        bail!(
            "{name} is {kind}, which bella-vqa cannot read (supported: \
             {SUPPORTED_IMAGE_FORMATS}): convert it to PNG or JPEG"
        );
    }
    let format = image::guess_format(bytes).map_err(|_| {
        anyhow!(
            "{name} is not an image in a supported format (supported: {SUPPORTED_IMAGE_FORMATS})"
        )
    })?;
    // The BMP decoder refuses sides past 65 535 as an error of its own, read as a damaged file:
    // measured here from the header, such a file is too large like any other.
    // (A header of zero width or height is left to the decoder, as for the other formats.)
    if let Some((width, height)) = (format == image::ImageFormat::Bmp)
        .then(|| bmp_size(bytes))
        .flatten()
        .filter(|&(w, h)| w > 0 && h > 0)
    {
        check_image_size(name, width, height, MAX_IMAGE_PIXELS)?;
    }
    Ok(format)
}

/// Width and height from a BMP's header (the OS/2 12-byte one, or the Windows ones whose height
/// is negative for top-down rows).
fn bmp_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let u32_at = |at: usize| Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    match u32_at(14)? {
        12 => Some((u32::from(u16_at(18)?), u32::from(u16_at(20)?))),
        _ => Some((
            (u32_at(18)? as i32).unsigned_abs(),
            (u32_at(22)? as i32).unsigned_abs(),
        )),
    }
}

/// What a file the image decoders do not know is, from its first bytes, where people give such
/// files as images: an iPhone's HEIC photograph, an AVIF, a video, a PDF or an SVG drawing.
fn other_format(bytes: &[u8]) -> Option<&'static str> {
    // ISO base media files (HEIF, AVIF, MP4, MOV): a size, "ftyp", then the major brand.
    if bytes.get(4..8) == Some(b"ftyp") {
        return Some(match bytes.get(8..12)? {
            b"heic" | b"heix" | b"hevc" | b"heim" | b"heis" | b"mif1" | b"msf1" => {
                "a HEIC/HEIF photograph"
            }
            b"avif" | b"avis" => "an AVIF image",
            _ => "a video (MP4/QuickTime)",
        });
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(256)]).to_ascii_lowercase();
    let markup = text
        .trim_start_matches('\u{feff}')
        .trim_start()
        .starts_with('<');
    if bytes.starts_with(b"%PDF") {
        Some("a PDF document")
    } else if markup && text.contains("<svg") {
        Some("an SVG drawing")
    } else {
        None
    }
}

/// Decodes an image held in memory (an upload), named `name` in errors, with the same checks as
/// [`load_image`] and at most `max_pixels` pixels (≤ [`MAX_IMAGE_PIXELS`]).
pub fn decode_image(bytes: &[u8], name: &str, max_pixels: u64) -> Result<DynamicImage> {
    let max_pixels = max_pixels.min(MAX_IMAGE_PIXELS);
    let format = image_format(bytes, name)?;
    // The JPEG decoder fills in what a truncated file lacks; Pillow (and so `transformers`)
    // refuses such a file, and so do we.
    if format == image::ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        bail!(
            "image {name} is truncated: the JPEG data ends before its end marker (a partial \
             download or copy?); fetch or save it again"
        );
    }
    // The dimensions first (from the header), so an oversized image is refused before its
    // pixels are allocated; then the decode, with the decoder's own allocation limits set.
    image_size(bytes, name, max_pixels)?;
    let reader = || ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    // 16-bit RGBA at the pixel limit, plus the decoders' scratch space.
    limits.max_alloc = Some(max_pixels * 8 + (256 << 20));
    let mut reader = reader();
    reader.limits(limits.clone());
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| describe_image_error(name, e))?;
    limits
        .reserve(decoder.total_bytes())
        .map_err(|e| describe_image_error(name, e))?;
    let (orientation, peak) = decode_peak(&mut decoder, bytes, format);
    ensure_memory(peak, || format!("decoding image {name}"))?;
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| describe_image_error(name, e))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// The most memory (bytes) that [`decode_image`] and then [`ImageProcessor::into_rgb8`] hold at
/// once for an image held in memory, read from its header (nothing is decoded): its pixels as
/// the decoder gives them (1 byte a pixel for 8-bit grey up to 8 for 16-bit RGBA), beside either
/// their copy turned a quarter (an EXIF orientation that swaps the sides) or their 8-bit RGB copy
/// (none when they are 8-bit RGB already). For images that [`image_size`] accepted.
pub fn decoding_bytes(bytes: &[u8], name: &str) -> Result<u64> {
    let format = image_format(bytes, name)?;
    let mut decoder = ImageReader::with_format(std::io::Cursor::new(bytes), format)
        .into_decoder()
        .map_err(|e| describe_image_error(name, e))?;
    let (width, height) = decoder.dimensions();
    let rgb = match decoder.color_type() {
        image::ColorType::Rgb8 => 0,
        _ => u64::from(width) * u64::from(height) * 3,
    };
    let (_, peak) = decode_peak(&mut decoder, bytes, format);
    Ok(peak.max(decoder.total_bytes().saturating_add(rgb)))
}

/// How the image is turned upright, and the most bytes its decoding holds until then: the
/// pixels as the decoder gives them, beside the decoder's own buffers ([`decoder_scratch`]) or,
/// later, their copy turned a quarter.
fn decode_peak(
    decoder: &mut impl ImageDecoder,
    bytes: &[u8],
    format: image::ImageFormat,
) -> (Orientation, u64) {
    let orientation = upright(decoder, bytes, format);
    let decoded = decoder.total_bytes();
    let turned = match swaps_sides(orientation) {
        true => decoded,
        false => 0,
    };
    let scratch = decoder_scratch(bytes, format, &*decoder);
    (orientation, decoded.saturating_add(scratch.max(turned)))
}

/// Whether turning an image by `o` swaps its sides: a quarter turn, made into a copy (half a
/// turn and the mirrors are made in place).
fn swaps_sides(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Fails, naming `what`, where `bytes` could not be allocated now. An allocation that fails
/// ends the process (under `ulimit -v`, or with overcommit off): the large ones an image needs
/// are asked for first, so that a huge image is an error about that image (`--skip-bad` skips
/// it) rather than an abort at the same question on every rerun.
fn ensure_memory(bytes: u64, what: impl FnOnce() -> String) -> Result<()> {
    let wanted = bytes.saturating_add((bytes / 4).min(MEMORY_SLACK));
    let mut probe: Vec<u8> = Vec::new();
    probe
        .try_reserve_exact(usize::try_from(wanted).unwrap_or(usize::MAX))
        .map_err(|_| {
            anyhow!(
                "not enough memory for {}: it needs about {} MB more at once than the process \
                 can take now (a limit such as ulimit -v, or the machine's memory); send a \
                 smaller image",
                what(),
                wanted.div_ceil(1 << 20)
            )
        })
}

/// The most [`ensure_memory`] asks for beyond an image's large buffers (a quarter of them, up to
/// this): the small allocations of the decoders and of answering, which end the process just as
/// well where nothing is left. Not more: a contiguous probe can fail where those small
/// allocations, spread over the threads' heaps, still fit (a small image was refused under
/// 200 MB with a fixed 32 MB).
const MEMORY_SLACK: u64 = 32 << 20;

/// How an image is turned upright, as `transformers`' `load_image` turns it
/// (`PIL.ImageOps.exif_transpose`): a phone stores a portrait photograph sideways with an EXIF
/// orientation tag. Unreadable metadata leaves the pixels as stored, as Pillow does.
fn upright(
    decoder: &mut impl ImageDecoder,
    bytes: &[u8],
    format: image::ImageFormat,
) -> Orientation {
    let exif = decoder.exif_metadata().ok().flatten().or_else(|| {
        // The PNG decoder reports only an eXIf chunk before the image data; Pillow finds one
        // after it too.
        (format == image::ImageFormat::Png)
            .then(|| png_chunk(bytes, b"eXIf").map(<[u8]>::to_vec))
            .flatten()
    });
    // A TIFF file is itself the TIFF structure an EXIF block is; Pillow turns a TIFF upright by
    // its first IFD's tag when it loads it.
    let orientation = match exif {
        Some(exif) => exif_orientation(&exif),
        None if format == image::ImageFormat::Tiff => exif_orientation(bytes),
        None => None,
    };
    orientation
        .and_then(Orientation::from_exif)
        .unwrap_or(Orientation::NoTransforms)
}

/// The Orientation tag (0x0112) of the first IFD of an EXIF block (a TIFF structure, with or
/// without JPEG's `Exif\0\0` header, which some writers keep in PNG and WebP chunks), stored as
/// a (signed or unsigned) SHORT or LONG with at least one value, as Pillow reads it. `None` when
/// there is none or the block is malformed.
fn exif_orientation(exif: &[u8]) -> Option<u8> {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let big = match tiff.get(..4)? {
        [b'I', b'I', 42, 0] => false,
        [b'M', b'M', 0, 42] => true,
        _ => return None,
    };
    let u16_at = |i: usize| {
        let b: [u8; 2] = tiff.get(i..i + 2)?.try_into().ok()?;
        Some(if big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |i: usize| {
        let b: [u8; 4] = tiff.get(i..i + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = usize::try_from(u32_at(4)?).ok()?;
    (0..usize::from(u16_at(ifd)?)).find_map(|k| {
        let entry = ifd + 2 + 12 * k;
        if u16_at(entry)? != 0x0112 || u32_at(entry + 4)? == 0 {
            return None;
        }
        // SHORT / SSHORT, LONG / SLONG (Pillow takes the signed types too).
        let value = match u16_at(entry + 2)? {
            3 | 8 => u32::from(u16_at(entry + 8)?),
            4 | 9 => u32_at(entry + 8)?,
            _ => return None,
        };
        u8::try_from(value).ok()
    })
}

/// The data of the first chunk of type `kind` in the PNG file `png`, wherever it is.
fn png_chunk<'a>(png: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    let mut at = 8; // the signature
    while let Some(header) = png.get(at..at + 8) {
        let len = usize::try_from(u32::from_be_bytes(header[..4].try_into().ok()?)).ok()?;
        let data = png.get(at + 8..at + 8 + len)?;
        if &header[4..] == kind {
            return Some(data);
        }
        if &header[4..] == b"IEND" {
            return None;
        }
        at += 12 + len;
    }
    None
}

/// The most an embedded colour profile may unpack to: Pillow's `MAX_TEXT_CHUNK`, past which it
/// refuses the PNG ("Decompressed Data Too Large"). Real profiles are a few kB to a few hundred.
const MAX_ICC_PROFILE_BYTES: usize = 1 << 20;

/// Refuses a PNG whose colour profile (its `iCCP` chunk, before the pixels) unpacks to more than
/// [`MAX_ICC_PROFILE_BYTES`], as Pillow (and so `transformers`) does: the decoder would unpack it
/// whole, and a 600 KB file can hold a profile of gigabytes. Reads the chunks up to the first
/// image data; anything else wrong with the file is left to the decoder.
fn check_png_profile<R: std::io::Read + std::io::Seek>(png: &mut R, name: &str) -> Result<()> {
    use std::io::{Read, SeekFrom};
    let read_error = || format!("cannot read image file {name}");
    png.seek(SeekFrom::Start(8)).with_context(read_error)?; // the signature
    let mut header = [0u8; 8];
    while png.read_exact(&mut header).is_ok() {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        match &header[4..] {
            b"IDAT" | b"IEND" => break,
            b"iCCP" => {
                let mut data = Vec::new();
                png.take(u64::from(len))
                    .read_to_end(&mut data)
                    .with_context(read_error)?;
                // Profile name, a 0 byte, the compression method (0: zlib), the profile.
                let packed = data
                    .iter()
                    .position(|&b| b == 0)
                    .and_then(|end| data.get(end + 2..));
                if let Some(packed) = packed {
                    let unpacked = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(
                        packed,
                        MAX_ICC_PROFILE_BYTES,
                    );
                    if matches!(&unpacked, Err(e) if e.status == miniz_oxide::inflate::TINFLStatus::HasMoreOutput)
                    {
                        bail!(
                            "image {name} embeds a colour profile (PNG iCCP chunk) that unpacks \
                             to more than {} MiB, which no real profile does (Pillow, and so \
                             transformers, refuses it too): save the image again without its \
                             profile",
                            MAX_ICC_PROFILE_BYTES >> 20
                        );
                    }
                }
                return Ok(());
            }
            _ => {}
        }
        png.seek(SeekFrom::Current(i64::from(len) + 4)) // the data and its CRC
            .with_context(read_error)?;
    }
    Ok(())
}

/// Refuses a JPEG whose frame this decoder cannot read (it reads 8-bit baseline, extended
/// sequential and progressive Huffman-coded frames), naming the kind, from its start-of-frame
/// marker; data where no frame header is found (not a JPEG, or past the bytes given) passes.
fn check_jpeg_frame(b: &[u8], name: &str) -> Result<()> {
    let Some((marker, precision)) = jpeg_frame(b).and_then(|(m, at)| Some((m, *b.get(at + 4)?)))
    else {
        return Ok(());
    };
    let kind = match marker {
        0xC3 | 0xC7 | 0xCB | 0xCF => "a lossless JPEG".to_string(),
        0xC5 | 0xC6 | 0xCD | 0xCE => "a hierarchical JPEG".to_string(),
        0xC9 | 0xCA => "an arithmetic-coded JPEG".to_string(),
        _ if precision != 8 => format!("a {precision}-bit JPEG"),
        _ => return Ok(()),
    };
    bail!(
        "{name} is {kind}, which this reader does not support (it reads 8-bit baseline and \
         progressive JPEGs): convert it to PNG or to an ordinary 8-bit JPEG"
    )
}

/// The start-of-frame marker (0xC0–0xCF but DHT, JPG and DAC) of JPEG data `b` and the index
/// of its 0xFF (the sample precision follows at +4, the component count at +9), from the
/// segments before the first scan.
fn jpeg_frame(b: &[u8]) -> Option<(u8, usize)> {
    if !b.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let is_frame = |m: u8| matches!(m, 0xC0..=0xCF) && !matches!(m, 0xC4 | 0xC8 | 0xCC);
    jpeg_markers(b)
        .take_while(|&(m, _)| m != 0xDA)
        .find(|&(m, _)| is_frame(m))
}

/// Whether the JPEG data `b` reaches its end-of-image marker ([`jpeg_markers`], so an EXIF
/// thumbnail's own end marker does not count). Data that does not start as a JPEG is left to the
/// decoder.
fn jpeg_is_complete(b: &[u8]) -> bool {
    !b.starts_with(&[0xFF, 0xD8]) || jpeg_markers(b).any(|(m, _)| m == 0xD9)
}

/// The markers of JPEG data `b` after its start-of-image marker, each with the index of its
/// 0xFF. Walks the segments by their lengths and the entropy-coded data after each start of scan,
/// where a marker is 0xFF followed by anything but 0x00 (stuffing), 0xFF (fill) or a restart
/// marker. Ends after the end-of-image marker, or at a marker whose segment length the data cuts
/// off, or where the data ends.
fn jpeg_markers(b: &[u8]) -> impl Iterator<Item = (u8, usize)> + '_ {
    let mut i = 2;
    let mut ended = false;
    std::iter::from_fn(move || {
        while !ended && i + 1 < b.len() && (b[i] != 0xFF || b[i + 1] == 0xFF) {
            i += 1; // padding between segments, fill bytes
        }
        if ended || i + 1 >= b.len() {
            return None;
        }
        let (at, marker) = (i, b[i + 1]);
        match (marker, b.get(i + 2..i + 4)) {
            (0xD9, _) => ended = true,
            (0x01 | 0xD0..=0xD7, _) => i += 2,
            (_, None) => ended = true,
            (_, Some(len)) => {
                i += 2 + usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xDA {
                    // Entropy-coded data up to the next real marker.
                    while i + 1 < b.len()
                        && (b[i] != 0xFF || matches!(b[i + 1], 0x00 | 0xFF | 0xD0..=0xD7))
                    {
                        i += 1;
                    }
                }
            }
        }
        Some((marker, at))
    })
}

fn check_image_size(name: &str, width: u32, height: u32, max_pixels: u64) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        bail!("image {name} is empty ({width}×{height})");
    }
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE || pixels > max_pixels {
        return Err(crate::error::ImageTooLarge {
            name: name.to_string(),
            width,
            height,
            max_side: MAX_IMAGE_SIDE,
            max_pixels,
        }
        .into());
    }
    Ok(())
}

fn describe_image_error(name: &str, err: image::ImageError) -> anyhow::Error {
    use image::ImageError as E;
    match err {
        // A known format in a variant the decoder lacks (a palette or float TIFF, …).
        E::Unsupported(e) if !matches!(e.kind(), image::error::UnsupportedErrorKind::Format(_)) => {
            anyhow!(
                "{name} is a kind of image this reader does not support ({e}): convert it to PNG \
                 or JPEG"
            )
        }
        E::Unsupported(e) => anyhow!(
            "{name} is not an image in a supported format (supported: {SUPPORTED_IMAGE_FORMATS}): \
             {e}; convert it to PNG or JPEG"
        ),
        E::Limits(e) => anyhow!(
            "image {name} is too large to decode (limits: {MAX_IMAGE_SIDE} pixels a side, {} Mpixel): {e}",
            MAX_IMAGE_PIXELS / (1024 * 1024)
        ),
        E::Decoding(e) => anyhow!(
            "cannot decode image {name} (corrupt or truncated? supported: {SUPPORTED_IMAGE_FORMATS}): {e}"
        ),
        E::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => anyhow!(
            "image {name} is truncated: its data ends early (a partial download or copy?); fetch \
             or save it again"
        ),
        E::IoError(e) => anyhow!("cannot read image {name}: {e}"),
        other => anyhow!("cannot load image {name}: {other}"),
    }
}

/// Pillow's resampling filters, numbered as `PIL.Image.Resampling` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 0
    Nearest,
    /// 1
    Lanczos,
    /// 2
    Bilinear,
    /// 3 (the default of CLIP and LLaVA)
    Bicubic,
    /// 4
    Box,
    /// 5
    Hamming,
}

impl Resample {
    /// The filter for a PIL resampling code (`0..=5`).
    pub fn from_pil(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    /// The PIL code of this filter.
    pub fn pil_code(self) -> i64 {
        match self {
            Self::Nearest => 0,
            Self::Lanczos => 1,
            Self::Bilinear => 2,
            Self::Bicubic => 3,
            Self::Box => 4,
            Self::Hamming => 5,
        }
    }
}

/// As `preprocessor_config.json` writes it.
impl std::fmt::Display for ResizeTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            ResizeTarget::ShortestEdge {
                shortest_edge,
                longest_edge: None,
            } => write!(f, "{{\"shortest_edge\": {shortest_edge}}}"),
            ResizeTarget::ShortestEdge {
                shortest_edge,
                longest_edge: Some(longest),
            } => write!(
                f,
                "{{\"shortest_edge\": {shortest_edge}, \"longest_edge\": {longest}}}"
            ),
            ResizeTarget::Exact { height, width } => {
                write!(f, "{{\"height\": {height}, \"width\": {width}}}")
            }
        }
    }
}

/// What `size` asks the resize step for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `{"shortest_edge": N}` (optionally with `"longest_edge"`): keep the aspect ratio.
    ShortestEdge {
        /// The length of the shorter side after resizing.
        shortest_edge: usize,
        /// An upper bound for the longer side, if any.
        longest_edge: Option<usize>,
    },
    /// `{"height": H, "width": W}`: resize to exactly this size.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// Where a model directory keeps its image processor settings, in transformers 5's order
/// ("nested config if found -> image processor config"): the `image_processor` entry of
/// `processor_config.json`, else `preprocessor_config.json` (a repository re-saved with
/// transformers 5 keeps its old file beside the new entry).
pub enum ProcessorSettings {
    Nested(PathBuf, Value),
    File(PathBuf),
}

impl ProcessorSettings {
    pub fn find(dir: &Path) -> Result<Option<Self>> {
        let proc = dir.join("processor_config.json");
        if proc.is_file() {
            let text = crate::input::read_to_string(&proc, "processor config")?;
            let json: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", proc.display()))?;
            if let Some(entry) = json.get("image_processor").filter(|v| !v.is_null()) {
                return Ok(Some(Self::Nested(proc, entry.clone())));
            }
        }
        let pre = dir.join("preprocessor_config.json");
        Ok(pre.is_file().then_some(Self::File(pre)))
    }

    /// The file (and key) the settings are read from, for messages.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Nested(..) => "processor_config.json, \"image_processor\"",
            Self::File(_) => "preprocessor_config.json",
        }
    }
}

/// An image processor configured like `transformers`' `CLIPImageProcessor` /
/// `LlavaImageProcessor`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Whether to resize.
    pub do_resize: bool,
    /// The resize target.
    pub size: ResizeTarget,
    /// The resampling filter.
    pub resample: Resample,
    /// Whether to centre-crop after resizing.
    pub do_center_crop: bool,
    /// `(height, width)` of the centre crop.
    pub crop_size: (usize, usize),
    /// Whether to multiply by `rescale_factor`.
    pub do_rescale: bool,
    /// Usually `1/255`.
    pub rescale_factor: f64,
    /// Whether to normalise with `image_mean` / `image_std`.
    pub do_normalize: bool,
    /// Per-channel mean (RGB).
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation (RGB).
    pub image_std: [f64; 3],
    /// Whether to convert to RGB (alpha composited onto white). Without it, alpha is dropped.
    pub do_convert_rgb: bool,
    /// LLaVA-1.5: pad to a square with the background colour `int(mean * 255)` before resizing.
    pub do_pad: bool,
}

impl Default for ImageProcessor {
    /// The class defaults of `CLIPImageProcessor` (and `LlavaImageProcessor`, whose only
    /// different default, `do_pad`, is also `false`).
    fn default() -> Self {
        Self {
            do_resize: true,
            size: ResizeTarget::ShortestEdge {
                shortest_edge: 224,
                longest_edge: None,
            },
            resample: Resample::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
            do_pad: false,
        }
    }
}

/// Processor types whose semantics this module implements.
const KNOWN_TYPES: &[&str] = &[
    "CLIPImageProcessor",
    "LlavaImageProcessor",
    "CLIPFeatureExtractor",
];

/// Keys that make a configuration "CLIP-like" when its type is unknown.
const CLIP_KEYS: &[&str] = &[
    "size",
    "crop_size",
    "do_resize",
    "do_center_crop",
    "do_normalize",
    "image_mean",
    "image_std",
    "rescale_factor",
];

impl ImageProcessor {
    /// Reads a `preprocessor_config.json`. Errors name the file (and the key where one is wrong).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::input::read_to_string(path, "image processor config")?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&json)
            .with_context(|| format!("in image processor config {}", path.display()))
    }

    /// The image processor of a model directory: `preprocessor_config.json`, or (as
    /// `transformers` 5 saves processors) the `"image_processor"` object of
    /// `processor_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        match ProcessorSettings::find(dir)? {
            Some(settings) => Self::from_settings(&settings),
            None => bail!(
                "no image processor config in {}: expected preprocessor_config.json, or \
                 processor_config.json with an \"image_processor\" entry",
                dir.display()
            ),
        }
    }

    /// The processor of settings found by [`ProcessorSettings::find`].
    pub fn from_settings(settings: &ProcessorSettings) -> Result<Self> {
        match settings {
            ProcessorSettings::Nested(path, entry) => Self::from_json(entry)
                .with_context(|| format!("in key \"image_processor\" of {}", path.display())),
            ProcessorSettings::File(path) => Self::from_file(path),
        }
    }

    /// Builds a processor from the JSON of a `preprocessor_config.json`; missing keys take the
    /// class defaults of `transformers`.
    pub fn from_json(json: &Value) -> Result<Self> {
        let obj = json
            .as_object()
            .ok_or_else(|| anyhow!("the image processor config must be a JSON object"))?;
        let kind = obj
            .get("image_processor_type")
            .or_else(|| obj.get("feature_extractor_type"))
            .and_then(Value::as_str)
            .map(|s| {
                s.trim_end_matches("Fast")
                    .trim_end_matches("Pil")
                    .to_string()
            });
        if obj.contains_key("image_grid_pinpoints") {
            bail!(
                "key \"image_grid_pinpoints\": LLaVA-NeXT \"anyres\" preprocessing is not supported \
                 (only CLIP and LLaVA-1.5 style processors are)"
            );
        }
        if let Some(kind) = &kind {
            let known = KNOWN_TYPES.iter().any(|k| k == kind);
            if !known && !CLIP_KEYS.iter().any(|k| obj.contains_key(*k)) {
                bail!(
                    "key \"image_processor_type\": unsupported image processor {kind:?} \
                     (supported: CLIPImageProcessor, LlavaImageProcessor, or a config with CLIP-like keys)"
                );
            }
        }
        let mut p = Self::default();
        p.do_resize = get_bool(obj, "do_resize")?.unwrap_or(p.do_resize);
        if let Some(v) = obj.get("size").filter(|v| !v.is_null()) {
            p.size = parse_size(v).context("key \"size\"")?;
        }
        if let Some(v) = obj.get("resample").filter(|v| !v.is_null()) {
            let code = as_int(v).context("key \"resample\"")?;
            p.resample = Resample::from_pil(code).ok_or_else(|| {
                anyhow!("key \"resample\": unknown PIL resampling code {code} (expected 0 to 5)")
            })?;
        }
        p.do_center_crop = get_bool(obj, "do_center_crop")?.unwrap_or(p.do_center_crop);
        if let Some(v) = obj.get("crop_size").filter(|v| !v.is_null()) {
            p.crop_size = parse_crop_size(v).context("key \"crop_size\"")?;
        }
        p.do_rescale = get_bool(obj, "do_rescale")?.unwrap_or(p.do_rescale);
        if let Some(v) = obj.get("rescale_factor").filter(|v| !v.is_null()) {
            p.rescale_factor = v
                .as_f64()
                .ok_or_else(|| anyhow!("key \"rescale_factor\": expected a number, got {v}"))?;
        }
        p.do_normalize = get_bool(obj, "do_normalize")?.unwrap_or(p.do_normalize);
        if let Some(v) = obj.get("image_mean").filter(|v| !v.is_null()) {
            p.image_mean = parse_triple(v).context("key \"image_mean\"")?;
        }
        if let Some(v) = obj.get("image_std").filter(|v| !v.is_null()) {
            p.image_std = parse_triple(v).context("key \"image_std\"")?;
            if p.image_std.contains(&0.0) {
                bail!("key \"image_std\": a standard deviation is zero");
            }
        }
        p.do_convert_rgb = get_bool(obj, "do_convert_rgb")?.unwrap_or(p.do_convert_rgb);
        p.do_pad = get_bool(obj, "do_pad")?.unwrap_or(p.do_pad);
        if p.do_pad && kind.as_deref() == Some("CLIPImageProcessor") {
            // CLIPImageProcessor has no `do_pad`; transformers ignores the key there.
            p.do_pad = false;
        }
        if p.do_pad && obj.contains_key("pad_size") {
            bail!(
                "key \"pad_size\": padding to a fixed size is not supported (only pad-to-square)"
            );
        }
        Ok(p)
    }

    /// `(height, width)` of every tensor this processor produces, when that does not depend on
    /// the input: the crop size with `do_center_crop`, the exact size with `{"height","width"}`,
    /// the square of a shortest-edge resize after `do_pad`. `None` when the size follows the
    /// input's aspect ratio (a shortest-edge resize of an unpadded image, or no resize).
    pub fn output_size(&self) -> Option<(usize, usize)> {
        if self.do_center_crop {
            return Some(self.crop_size);
        }
        match self.size {
            _ if !self.do_resize => None,
            ResizeTarget::Exact { height, width } => Some((height, width)),
            ResizeTarget::ShortestEdge { shortest_edge, .. } if self.do_pad => {
                self.resize_output_size(shortest_edge, shortest_edge).ok()
            }
            ResizeTarget::ShortestEdge { .. } => None,
        }
    }

    /// The processed image as `f32 [3, H, W]` on the CPU.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Tensor> {
        let (data, h, w) = self.preprocess_to_vec(img)?;
        Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
    }

    /// A batch `f32 [N, 3, H, W]`. All images must come out at the same size (always true with a
    /// centre crop or an exact resize).
    pub fn preprocess_batch(&self, imgs: &[DynamicImage]) -> Result<Tensor> {
        if imgs.is_empty() {
            bail!("preprocess_batch needs at least one image");
        }
        let mut all = Vec::new();
        let mut shape = None;
        for (i, img) in imgs.iter().enumerate() {
            let (data, h, w) = self.preprocess_to_vec(img)?;
            match shape {
                None => shape = Some((h, w)),
                Some(s) if s != (h, w) => bail!(
                    "image {i} comes out at {h}×{w} but image 0 at {}×{}: a batch needs one size \
                     (enable do_center_crop or an exact size)",
                    s.0,
                    s.1
                ),
                _ => {}
            }
            all.extend_from_slice(&data);
        }
        let (h, w) = shape.unwrap_or((0, 0));
        Ok(Tensor::from_vec(all, (imgs.len(), 3, h, w), &Device::Cpu)?)
    }

    /// The image as the first step makes it (8-bit RGB, see [`to_rgb`]): preprocessing the
    /// result gives exactly what preprocessing `img` gives.
    pub fn into_rgb8(&self, img: DynamicImage) -> Result<image::RgbImage> {
        if let DynamicImage::ImageRgb8(rgb) = img {
            return Ok(rgb);
        }
        let rgb = to_rgb(&img, self.do_convert_rgb);
        image::RgbImage::from_raw(rgb.width as u32, rgb.height as u32, rgb.data)
            .context("the RGB conversion made a buffer of the wrong size")
    }

    /// The most bytes the integer steps hold at once for a `width × height` input (8-bit RGB:
    /// the image, and each step's output beside its input, the resampler's intermediate pass
    /// included; padding and resizing together hold no square, [`pad_and_resize`]). A padding or
    /// resize that would pass [`MAX_IMAGE_PIXELS`] is refused here, before anything is
    /// allocated: a few kilobytes of a 32768×20 PNG pad to a gigapixel square.
    pub fn working_bytes(&self, width: usize, height: usize) -> Result<u64> {
        let px = |w: usize, h: usize| (w as u64).saturating_mul(h as u64);
        let (mut w, mut h) = (width, height);
        let mut peak = px(w, h);
        if self.do_pad {
            let side = w.max(h);
            let resized = match self.do_resize {
                true => Some(self.resize_output_size(side, side)?),
                false => None,
            };
            match resized {
                // Resampled row by row from the image: the `side × ow` pass and the output.
                Some((oh, ow))
                    if self.resample != Resample::Nearest && w != h && (oh, ow) != (side, side) =>
                {
                    return Ok((px(w, h) + px(side, ow) + px(ow, oh)).saturating_mul(3));
                }
                _ => {}
            }
            if px(side, side) > MAX_IMAGE_PIXELS {
                bail!(
                    "padding a {w}×{h} image to a square gives {side}×{side}, more than \
                     {MAX_IMAGE_PIXELS} pixels: crop the image to a less extreme aspect ratio"
                );
            }
            peak = peak.max(px(w, h) + px(side, side));
            (w, h) = (side, side);
        }
        if self.do_resize {
            let (oh, ow) = self.resize_output_size(h, w)?;
            peak = peak.max(px(w, h) + px(ow, h).max(px(w, oh)) + px(ow, oh));
        }
        Ok(peak.saturating_mul(3))
    }

    /// The pixel values after the integer steps (RGB conversion, padding, resizing, cropping):
    /// an 8-bit RGB image, as `transformers` has it just before rescaling.
    /// An image past [`MAX_IMAGE_SIDE`] or [`MAX_IMAGE_PIXELS`] (one made in memory, which no
    /// decoding limited) is refused as [`crate::error::ImageTooLarge`] before it is copied.
    pub fn preprocess_u8(&self, img: &DynamicImage) -> Result<RgbU8> {
        check_image_size("given", img.width(), img.height(), MAX_IMAGE_PIXELS)?;
        let working = self.working_bytes(img.width() as usize, img.height() as usize)?;
        ensure_memory(working, || {
            format!("preparing a {}×{} image", img.width(), img.height())
        })?;
        let mut rgb = to_rgb(img, self.do_convert_rgb);
        match (self.do_pad, self.do_resize) {
            (true, true) => {
                let side = rgb.width.max(rgb.height);
                let (oh, ow) = self.resize_output_size(side, side)?;
                rgb = pad_and_resize(&rgb, self.pad_color(), ow, oh, self.resample)?;
            }
            (true, false) => rgb = pad_to_square(&rgb, self.pad_color()),
            (false, true) => {
                let (oh, ow) = self.resize_output_size(rgb.height, rgb.width)?;
                rgb = pil_resize(&rgb, ow, oh, self.resample)?;
            }
            (false, false) => {}
        }
        if self.do_center_crop {
            rgb = center_crop(&rgb, self.crop_size.0, self.crop_size.1);
        }
        Ok(rgb)
    }

    /// The padding colour of `do_pad`: `tuple(int(x * 255) for x in image_mean)`.
    pub fn pad_color(&self) -> [u8; 3] {
        self.image_mean
            .map(|m| (m * 255.0).trunc().clamp(0.0, 255.0) as u8)
    }

    /// The `(height, width)` the resize step produces for an input of `height × width`, as
    /// `transformers`' `get_resize_output_image_size(..., default_to_square=False)` computes it.
    pub fn resize_output_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let (oh, ow) = match self.size {
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge {
                shortest_edge,
                longest_edge: None,
            } => shortest_edge_size(height, width, shortest_edge),
            ResizeTarget::ShortestEdge {
                shortest_edge,
                longest_edge: Some(max),
            } => size_with_aspect_ratio(height, width, shortest_edge, max),
        };
        if oh == 0 || ow == 0 {
            bail!(
                "resizing a {width}×{height} image to {} gives an empty image",
                self.size
            );
        }
        if (oh as u64).saturating_mul(ow as u64) > MAX_IMAGE_PIXELS {
            bail!(
                "resizing a {width}×{height} image to {} gives {ow}×{oh}, more than \
                 {MAX_IMAGE_PIXELS} pixels: crop the image to a less extreme aspect ratio",
                self.size
            );
        }
        Ok((oh, ow))
    }

    fn preprocess_to_vec(&self, img: &DynamicImage) -> Result<(Vec<f32>, usize, usize)> {
        let rgb = self.preprocess_u8(img)?;
        let (h, w) = (rgb.height, rgb.width);
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        let mean = self.image_mean.map(|m| m as f32);
        let std = self.image_std.map(|s| s as f32);
        for (i, px) in rgb.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                let mut v = if self.do_rescale {
                    // numpy: image.astype(float64) * scale, then astype(float32)
                    (f64::from(px[c]) * self.rescale_factor) as f32
                } else {
                    f32::from(px[c])
                };
                if self.do_normalize {
                    // numpy float32: (image - mean) / std
                    v = (v - mean[c]) / std[c];
                }
                out[c * plane + i] = v;
            }
        }
        Ok((out, h, w))
    }
}

fn get_bool(obj: &serde_json::Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!("key {key:?}: expected true or false, got {other}"),
    }
}

fn as_int(v: &Value) -> Result<i64> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    if let Some(f) = v.as_f64() {
        if f.fract() == 0.0 && f.abs() < 1e15 {
            return Ok(f as i64);
        }
    }
    bail!("expected an integer, got {v}")
}

fn as_size(v: &Value) -> Result<usize> {
    let i = as_int(v)?;
    if i <= 0 {
        bail!("expected a positive size, got {i}");
    }
    let size = usize::try_from(i).map_err(|_| anyhow!("size {i} is out of range"))?;
    if size > MAX_PROCESSED_SIDE {
        bail!("size {size} is larger than {MAX_PROCESSED_SIDE} pixels a side");
    }
    Ok(size)
}

/// `size`: CLIP and LLaVA use `default_to_square=False`, so a bare integer is a shortest edge.
fn parse_size(v: &Value) -> Result<ResizeTarget> {
    match v {
        Value::Number(_) => Ok(ResizeTarget::ShortestEdge {
            shortest_edge: as_size(v)?,
            longest_edge: None,
        }),
        Value::Array(a) if a.len() == 2 => Ok(ResizeTarget::Exact {
            height: as_size(&a[0])?,
            width: as_size(&a[1])?,
        }),
        Value::Object(o) => {
            let get = |k: &str| -> Result<Option<usize>> {
                match o.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => as_size(x).map(Some).with_context(|| format!("field {k:?}")),
                }
            };
            if let Some(shortest_edge) = get("shortest_edge")? {
                return Ok(ResizeTarget::ShortestEdge {
                    shortest_edge,
                    longest_edge: get("longest_edge")?,
                });
            }
            match (get("height")?, get("width")?) {
                (Some(height), Some(width)) => Ok(ResizeTarget::Exact { height, width }),
                _ => bail!(
                    "expected {{\"shortest_edge\": N}} or {{\"height\": H, \"width\": W}}, got {v} \
                     (other size forms are not supported)"
                ),
            }
        }
        _ => bail!("expected an integer or an object, got {v}"),
    }
}

/// `crop_size`: a bare integer means a square (`default_to_square=True`).
fn parse_crop_size(v: &Value) -> Result<(usize, usize)> {
    match v {
        Value::Number(_) => {
            let s = as_size(v)?;
            Ok((s, s))
        }
        Value::Array(a) if a.len() == 2 => Ok((as_size(&a[0])?, as_size(&a[1])?)),
        Value::Object(o) => {
            let h = o
                .get("height")
                .ok_or_else(|| anyhow!("expected \"height\" and \"width\", got {v}"))?;
            let w = o
                .get("width")
                .ok_or_else(|| anyhow!("expected \"height\" and \"width\", got {v}"))?;
            Ok((as_size(h)?, as_size(w)?))
        }
        _ => bail!("expected an integer or {{\"height\": H, \"width\": W}}, got {v}"),
    }
}

fn parse_triple(v: &Value) -> Result<[f64; 3]> {
    match v {
        Value::Number(n) => {
            let x = n
                .as_f64()
                .ok_or_else(|| anyhow!("expected a number, got {v}"))?;
            Ok([x; 3])
        }
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| anyhow!("expected numbers, got {v}"))?;
            }
            Ok(out)
        }
        _ => bail!("expected a number or a list of 3 numbers (RGB), got {v}"),
    }
}

/// `get_resize_output_image_size(image, size, default_to_square=False)`.
fn shortest_edge_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python: int(size * long / short), true division in double precision.
    let new_long = ((size as f64 * long as f64) / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// `get_size_with_aspect_ratio(image_size, size, max_size)` (shortest and longest edge).
fn size_with_aspect_ratio(
    height: usize,
    width: usize,
    size: usize,
    max_size: usize,
) -> (usize, usize) {
    let mut size = size;
    let mut raw_size = None;
    let min_original = height.min(width) as f64;
    let max_original = height.max(width) as f64;
    if max_original / min_original * size as f64 > max_size as f64 {
        let raw = max_size as f64 * min_original / max_original;
        raw_size = Some(raw);
        size = python_round(raw) as usize;
    }
    if (height <= width && height == size) || (width <= height && width == size) {
        (height, width)
    } else if width < height {
        let oh = match raw_size {
            Some(raw) => (raw * height as f64 / width as f64) as usize,
            None => (size as f64 * height as f64 / width as f64) as usize,
        };
        (oh, size)
    } else {
        let ow = match raw_size {
            Some(raw) => (raw * width as f64 / height as f64) as usize,
            None => (size as f64 * width as f64 / height as f64) as usize,
        };
        (size, ow)
    }
}

/// Python's `round()` (half to even).
fn python_round(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbU8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

/// Converts to 8-bit RGB the way `transformers`' `convert_to_rgb` does with PIL: images with an
/// alpha channel are composited onto opaque white (Pillow's `alpha_composite`, integer
/// arithmetic; transformers 5 does so for every processor, 4.x dropped alpha in CLIP's and
/// LLaVA's), grey is replicated. 16-bit images keep their high byte (as Pillow reads 16-bit
/// RGB PNGs). 16-bit grey does too, on purpose unlike Pillow, whose `I;16` → RGB conversion clamps
/// every value above 255 to white (a 16-bit grey photograph would reach the model blank, and one
/// whose values all lie below 256 is read as 8-bit, where we see it near black). With
/// `composite_alpha == false` alpha is dropped instead.
pub fn to_rgb(img: &DynamicImage, composite_alpha: bool) -> RgbU8 {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let n = width * height;
    let data = match img {
        DynamicImage::ImageRgb8(im) => im.as_raw().clone(),
        DynamicImage::ImageLuma8(im) => rgb_pixels(n, im.as_raw().iter().map(|&l| [l, l, l])),
        DynamicImage::ImageLumaA8(im) => rgba_to_rgb(
            n,
            composite_alpha,
            im.as_raw()
                .chunks_exact(2)
                .map(|p| [p[0], p[0], p[0], p[1]]),
        ),
        DynamicImage::ImageRgba8(im) => rgba_to_rgb(
            n,
            composite_alpha,
            im.as_raw()
                .chunks_exact(4)
                .map(|p| [p[0], p[1], p[2], p[3]]),
        ),
        DynamicImage::ImageRgb16(im) => rgb_pixels(
            n,
            im.as_raw()
                .chunks_exact(3)
                .map(|p| [high(p[0]), high(p[1]), high(p[2])]),
        ),
        DynamicImage::ImageRgba16(im) => rgba_to_rgb(
            n,
            composite_alpha,
            im.as_raw()
                .chunks_exact(4)
                .map(|p| [high(p[0]), high(p[1]), high(p[2]), high(p[3])]),
        ),
        DynamicImage::ImageLuma16(im) => rgb_pixels(
            n,
            im.as_raw().iter().map(|&l| {
                let h = high(l);
                [h, h, h]
            }),
        ),
        DynamicImage::ImageLumaA16(im) => rgba_to_rgb(
            n,
            composite_alpha,
            im.as_raw().chunks_exact(2).map(|p| {
                let l = high(p[0]);
                [l, l, l, high(p[1])]
            }),
        ),
        other if other.color().has_alpha() => rgba_to_rgb(
            n,
            composite_alpha,
            other
                .to_rgba8()
                .as_raw()
                .chunks_exact(4)
                .map(|p| [p[0], p[1], p[2], p[3]]),
        ),
        other => other.to_rgb8().into_raw(),
    };
    RgbU8 {
        width,
        height,
        data,
    }
}

/// The high byte of a 16-bit sample.
fn high(v: u16) -> u8 {
    (v >> 8) as u8
}

/// `n` RGB pixels as bytes.
fn rgb_pixels(n: usize, pixels: impl Iterator<Item = [u8; 3]>) -> Vec<u8> {
    let mut data = Vec::with_capacity(n * 3);
    for p in pixels {
        data.extend_from_slice(&p);
    }
    data
}

/// `n` RGBA pixels as RGB bytes: composited onto white, or with alpha dropped.
fn rgba_to_rgb(n: usize, composite_alpha: bool, pixels: impl Iterator<Item = [u8; 4]>) -> Vec<u8> {
    rgb_pixels(
        n,
        pixels.map(|[r, g, b, a]| match composite_alpha {
            true => composite_on_white([r, g, b], a),
            false => [r, g, b],
        }),
    )
}

/// Pillow's `alpha_composite(white, src)` for one pixel (`AlphaComposite.c`, 7-bit precision).
fn composite_on_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    const PRECISION_BITS: u32 = 7;
    if a == 0 {
        return [255, 255, 255];
    }
    let sa = u32::from(a);
    let blend = 255 * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    rgb.map(|c| {
        let tmp = u32::from(c) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
        let div255 = ((tmp >> 8) + tmp) >> 8;
        (div255 >> PRECISION_BITS).min(255) as u8
    })
}

/// LLaVA's `pad_to_square`: the longer side stays, the shorter is padded on both sides (the
/// extra pixel of an odd difference goes after the image) with `background`.
pub fn pad_to_square(img: &RgbU8, background: [u8; 3]) -> RgbU8 {
    let (h, w) = (img.height, img.width);
    if h == w {
        return img.clone();
    }
    let side = h.max(w);
    let mut data = Vec::with_capacity(side * side * 3);
    for _ in 0..side * side {
        data.extend_from_slice(&background);
    }
    let (top, left) = if w > h {
        ((side - h) / 2, 0)
    } else {
        (0, (side - w) / 2)
    };
    for y in 0..h {
        let src = &img.data[y * w * 3..(y + 1) * w * 3];
        let start = ((top + y) * side + left) * 3;
        data[start..start + w * 3].copy_from_slice(src);
    }
    RgbU8 {
        width: side,
        height: side,
        data,
    }
}

/// `transformers`' `center_crop`: `top = (H - h) // 2`, `left = (W - w) // 2`; where the image is
/// smaller than the crop it is first padded with zeros (centred, `ceil` of half the difference
/// before it).
pub fn center_crop(img: &RgbU8, crop_h: usize, crop_w: usize) -> RgbU8 {
    let (h, w) = (img.height, img.width);
    if crop_h <= h && crop_w <= w {
        let top = (h - crop_h) / 2;
        let left = (w - crop_w) / 2;
        let mut data = Vec::with_capacity(crop_h * crop_w * 3);
        for y in top..top + crop_h {
            data.extend_from_slice(&img.data[(y * w + left) * 3..(y * w + left + crop_w) * 3]);
        }
        return RgbU8 {
            width: crop_w,
            height: crop_h,
            data,
        };
    }
    // Pad with zeros to at least the crop size, then crop (the numpy code's index arithmetic).
    let new_h = crop_h.max(h);
    let new_w = crop_w.max(w);
    let top_pad = (new_h - h).div_ceil(2);
    let left_pad = (new_w - w).div_ceil(2);
    let mut padded = vec![0u8; new_h * new_w * 3];
    for y in 0..h {
        let dst = ((top_pad + y) * new_w + left_pad) * 3;
        padded[dst..dst + w * 3].copy_from_slice(&img.data[y * w * 3..(y + 1) * w * 3]);
    }
    // top = (h - crop_h) // 2 (floor division, may be negative), shifted by the padding.
    let top = (h as i64 - crop_h as i64).div_euclid(2) + top_pad as i64;
    let left = (w as i64 - crop_w as i64).div_euclid(2) + left_pad as i64;
    let y0 = top.max(0) as usize;
    let y1 = ((top + crop_h as i64).min(new_h as i64)) as usize;
    let x0 = left.max(0) as usize;
    let x1 = ((left + crop_w as i64).min(new_w as i64)) as usize;
    let (out_h, out_w) = (y1 - y0, x1 - x0);
    let mut data = Vec::with_capacity(out_h * out_w * 3);
    for y in y0..y1 {
        data.extend_from_slice(&padded[(y * new_w + x0) * 3..(y * new_w + x1) * 3]);
    }
    RgbU8 {
        width: out_w,
        height: out_h,
        data,
    }
}

// ---------------------------------------------------------------------------------------------
// Pillow's resampler (libImaging/Resample.c), 8 bits a channel.

fn filter_support(f: Resample) -> f64 {
    match f {
        Resample::Box => 0.5,
        Resample::Bilinear | Resample::Hamming => 1.0,
        Resample::Bicubic => 2.0,
        Resample::Lanczos => 3.0,
        Resample::Nearest => 0.0,
    }
}

fn filter_eval(f: Resample, x: f64) -> f64 {
    match f {
        Resample::Box => {
            if x > -0.5 && x <= 0.5 {
                1.0
            } else {
                0.0
            }
        }
        Resample::Bilinear => {
            let x = x.abs();
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Resample::Hamming => {
            let x = x.abs();
            if x == 0.0 {
                1.0
            } else if x >= 1.0 {
                0.0
            } else {
                let x = x * std::f64::consts::PI;
                // The C code uses the float literals 0.54f and 0.46f.
                x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
            }
        }
        Resample::Bicubic => {
            const A: f64 = -0.5;
            let x = x.abs();
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
        Resample::Lanczos => {
            if (-3.0..3.0).contains(&x) {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            }
        }
        Resample::Nearest => 0.0,
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// `precompute_coeffs` followed by `normalize_coeffs_8bpc`: for each output position the first
/// input index, the number of taps, and the fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter_support(filter) * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C: (int)(center - support + 0.5), truncation toward zero, then clamped.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        k.iter_mut().for_each(|v| *v = 0.0);
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter_eval(filter, ((x + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        if ww != 0.0 {
            for kx in k.iter_mut().take(n) {
                *kx /= ww;
            }
        }
        for (x, &kx) in k.iter().enumerate() {
            let scaled = kx * f64::from(1u32 << PRECISION_BITS);
            kk[xx * ksize + x] = if kx < 0.0 {
                (-0.5 + scaled) as i32
            } else {
                (0.5 + scaled) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like Pillow's `Image.resize((width, height), resample)` on an RGB image.
///
/// Pillow resamples in two separable passes with 8-bit rounding in between, so the order of the
/// passes matters. Pillow 13 (measured against it on random sizes and all five filters) runs the
/// vertical pass first exactly when the height shrinks by more than twice as many pixels as the
/// width does (`in_h - out_h > 2 * (in_w - out_w)` with `out_h < in_h`), the horizontal pass first
/// otherwise; older Pillow releases always ran the horizontal pass first.
pub fn pil_resize(img: &RgbU8, out_w: usize, out_h: usize, filter: Resample) -> Result<RgbU8> {
    if out_w == 0 || out_h == 0 {
        bail!("cannot resize to an empty image ({out_w}×{out_h})");
    }
    if img.width == 0 || img.height == 0 {
        bail!(
            "cannot resize an empty image ({}×{})",
            img.width,
            img.height
        );
    }
    if img.width == out_w && img.height == out_h {
        return Ok(img.clone());
    }
    if filter == Resample::Nearest {
        return Ok(nearest_resize(img, out_w, out_h));
    }
    let (in_w, in_h) = (img.width as i64, img.height as i64);
    let vertical_first = (out_h as i64) < in_h && in_h - out_h as i64 > 2 * (in_w - out_w as i64);
    let mut cur = std::borrow::Cow::Borrowed(img);
    if vertical_first {
        cur = std::borrow::Cow::Owned(resample_vertical(&cur, out_h, filter));
    }
    if cur.width != out_w {
        cur = std::borrow::Cow::Owned(resample_horizontal(&cur, out_w, filter));
    }
    if cur.height != out_h {
        cur = std::borrow::Cow::Owned(resample_vertical(&cur, out_h, filter));
    }
    Ok(cur.into_owned())
}

/// One horizontal pass of `ImagingResampleHorizontal_8bpc`.
fn resample_horizontal(img: &RgbU8, out_w: usize, filter: Resample) -> RgbU8 {
    let (in_w, h) = (img.width, img.height);
    let co = precompute_coeffs(in_w, out_w, filter);
    let mut out = vec![0u8; h * out_w * 3];
    for y in 0..h {
        resample_row(
            &img.data[y * in_w * 3..(y + 1) * in_w * 3],
            &mut out[y * out_w * 3..(y + 1) * out_w * 3],
            &co,
            0..in_w,
        );
    }
    RgbU8 {
        width: out_w,
        height: h,
        data: out,
    }
}

/// One row of [`resample_horizontal`]: the output pixels whose kernel reaches a source column
/// in `span`; the others are left as they are.
fn resample_row(src_row: &[u8], dst_row: &mut [u8], co: &Coeffs, span: Range<usize>) {
    for (xx, dst) in dst_row.chunks_exact_mut(3).enumerate() {
        let (xmin, n) = co.bounds[xx];
        if xmin >= span.end || xmin + n <= span.start {
            continue;
        }
        let k = &co.kk[xx * co.ksize..xx * co.ksize + n];
        let mut ss = [1i64 << (PRECISION_BITS - 1); 3];
        for (x, &kx) in k.iter().enumerate() {
            let p = &src_row[(x + xmin) * 3..(x + xmin) * 3 + 3];
            for c in 0..3 {
                ss[c] += i64::from(p[c]) * i64::from(kx);
            }
        }
        for c in 0..3 {
            dst[c] = clip8(ss[c]);
        }
    }
}

/// `pil_resize(&pad_to_square(img, background), out_w, out_h, filter)` without the square: a
/// square input is resampled horizontally first, and a padded row is the background's (its
/// result computed once) or the image's row between background pixels, so only the
/// `side × out_w` intermediate is held (a 18000×3500 panorama padded to its square is 0.97 GB),
/// and the time is that of the image's pixels and the output's, not the square's (a 2×32768
/// strip padded to its square is 1.07 G pixels).
/// Pillow's filters other than NEAREST.
pub fn pad_and_resize(
    img: &RgbU8,
    background: [u8; 3],
    out_w: usize,
    out_h: usize,
    filter: Resample,
) -> Result<RgbU8> {
    let (w, h) = (img.width, img.height);
    let side = w.max(h);
    if filter == Resample::Nearest || (out_w, out_h) == (side, side) || w == h {
        return pil_resize(&pad_to_square(img, background), out_w, out_h, filter);
    }
    if out_w == 0 || out_h == 0 {
        bail!("cannot resize to an empty image ({out_w}×{out_h})");
    }
    let (top, left) = if w > h {
        ((side - h) / 2, 0)
    } else {
        (0, (side - w) / 2)
    };
    let co = precompute_coeffs(side, out_w, filter);
    let background_row: Vec<u8> = background.repeat(side);
    let mut background_out = vec![0u8; out_w * 3];
    resample_row(&background_row, &mut background_out, &co, 0..side);
    let mut row = background_row.clone();
    let mut horizontal = vec![0u8; side * out_w * 3];
    for (y, dst) in horizontal.chunks_exact_mut(out_w * 3).enumerate() {
        if y < top || y >= top + h {
            dst.copy_from_slice(&background_out);
            continue;
        }
        let src = &img.data[(y - top) * w * 3..(y - top + 1) * w * 3];
        row[left * 3..(left + w) * 3].copy_from_slice(src);
        // An output pixel whose kernel sees only padding is the background's (integer sums over
        // the same pixels): only those that reach the image are summed, so a tall narrow image
        // costs its own pixels, not its padded square's.
        dst.copy_from_slice(&background_out);
        resample_row(&row, dst, &co, left..left + w);
    }
    let horizontal = RgbU8 {
        width: out_w,
        height: side,
        data: horizontal,
    };
    Ok(if out_h == side {
        horizontal
    } else {
        resample_vertical(&horizontal, out_h, filter)
    })
}

/// One vertical pass of `ImagingResampleVertical_8bpc`.
fn resample_vertical(img: &RgbU8, out_h: usize, filter: Resample) -> RgbU8 {
    let (w, in_h) = (img.width, img.height);
    let co = precompute_coeffs(in_h, out_h, filter);
    let mut out = vec![0u8; out_h * w * 3];
    for yy in 0..out_h {
        let (ymin, n) = co.bounds[yy];
        let k = &co.kk[yy * co.ksize..yy * co.ksize + n];
        for xx in 0..w {
            let mut ss = [1i64 << (PRECISION_BITS - 1); 3];
            for (y, &ky) in k.iter().enumerate() {
                let i = ((y + ymin) * w + xx) * 3;
                let p = &img.data[i..i + 3];
                for c in 0..3 {
                    ss[c] += i64::from(p[c]) * i64::from(ky);
                }
            }
            for c in 0..3 {
                out[(yy * w + xx) * 3 + c] = clip8(ss[c]);
            }
        }
    }
    RgbU8 {
        width: w,
        height: out_h,
        data: out,
    }
}

/// Pillow's NEAREST resize (an affine transform: source = floor((x + 0.5) * scale), accumulated).
fn nearest_resize(img: &RgbU8, out_w: usize, out_h: usize) -> RgbU8 {
    let coords = |in_size: usize, out_size: usize| -> Vec<usize> {
        let a = in_size as f64 / out_size as f64;
        let mut o = a * 0.5;
        let mut v = Vec::with_capacity(out_size);
        for _ in 0..out_size {
            v.push((o.max(0.0) as usize).min(in_size - 1));
            o += a;
        }
        v
    };
    let xs = coords(img.width, out_w);
    let ys = coords(img.height, out_h);
    let mut data = Vec::with_capacity(out_w * out_h * 3);
    for &y in &ys {
        for &x in &xs {
            let i = (y * img.width + x) * 3;
            data.extend_from_slice(&img.data[i..i + 3]);
        }
    }
    RgbU8 {
        width: out_w,
        height: out_h,
        data,
    }
}
