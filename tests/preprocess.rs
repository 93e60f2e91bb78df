//! Image preprocessing: hand-computed cases, Pillow outputs pinned from Pillow 13, and parity with
//! the pixel values `transformers` produced.

mod common;

use bella_vqa::models::image::{
    center_crop, decode_image, decoding_bytes, load_image, pad_to_square, pil_resize, to_rgb,
    ImageProcessor, Resample, ResizeTarget, RgbU8, MAX_IMAGE_PIXELS, OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
};
use candle_core::{DType, Tensor};
use common::{exif_orientation, fixture, max_abs_diff, png_of, reference};
use image::{DynamicImage, ImageBuffer, Rgb, Rgba};
use serde_json::json;
use std::path::Path;

fn rgb(width: usize, height: usize, data: Vec<u8>) -> RgbU8 {
    assert_eq!(data.len(), width * height * 3);
    RgbU8 {
        width,
        height,
        data,
    }
}

fn dynamic(img: &RgbU8) -> DynamicImage {
    let buf: ImageBuffer<Rgb<u8>, Vec<u8>> =
        ImageBuffer::from_raw(img.width as u32, img.height as u32, img.data.clone()).unwrap();
    DynamicImage::ImageRgb8(buf)
}

/// A 4×2 image whose pixel (x, y) is (10x + y, 100 + 10x + y, 200 + 10x + y).
fn four_by_two() -> RgbU8 {
    let mut data = Vec::new();
    for y in 0..2u8 {
        for x in 0..4u8 {
            data.extend_from_slice(&[10 * x + y, 100 + 10 * x + y, 200 + 10 * x + y]);
        }
    }
    rgb(4, 2, data)
}

/// A processor that does nothing but the steps named in `json` (all others off).
fn only(json: serde_json::Value) -> ImageProcessor {
    let mut base = json!({
        "do_resize": false, "do_center_crop": false, "do_rescale": false, "do_normalize": false,
        "do_pad": false, "image_processor_type": "LlavaImageProcessor"
    });
    for (k, v) in json.as_object().unwrap() {
        base[k] = v.clone();
    }
    ImageProcessor::from_json(&base).unwrap()
}

fn to_u8_vec(t: &Tensor) -> (Vec<usize>, Vec<u8>) {
    let dims = t.dims().to_vec();
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    (dims, v.iter().map(|&x| x as u8).collect())
}

/// CHW planes of an HWC image.
fn planes(img: &RgbU8) -> Vec<u8> {
    let mut out = Vec::new();
    for c in 0..3 {
        out.extend(img.data.chunks_exact(3).map(|p| p[c]));
    }
    out
}

#[test]
fn pad_to_square_wide_image_uses_mean_colour() {
    let p = only(json!({"do_pad": true}));
    assert_eq!(p.pad_color(), [122, 116, 104]); // int(x * 255) of the CLIP mean
    let t = p.preprocess(&dynamic(&four_by_two())).unwrap();
    let (dims, v) = to_u8_vec(&t);
    assert_eq!(dims, vec![3, 4, 4]);
    // (4 - 2) // 2 = 1 background row above, 1 below.
    let bg = [122u8, 116, 104];
    for c in 0..3 {
        for y in 0..4 {
            for x in 0..4 {
                let got = v[c * 16 + y * 4 + x];
                let want = match y {
                    1 | 2 => [0u8, 100, 200][c] + 10 * x as u8 + (y as u8 - 1),
                    _ => bg[c],
                };
                assert_eq!(got, want, "c={c} y={y} x={x}");
            }
        }
    }
}

#[test]
fn pad_to_square_tall_and_odd_difference() {
    // 1 wide, 4 tall: (4 - 1) // 2 = 1 column before, 2 after.
    let img = rgb(1, 4, (0..12).collect());
    let out = pad_to_square(&img, [9, 8, 7]);
    assert_eq!((out.width, out.height), (4, 4));
    for y in 0..4 {
        let row = &out.data[y * 12..(y + 1) * 12];
        assert_eq!(&row[0..3], &[9, 8, 7]);
        assert_eq!(&row[3..6], &img.data[y * 3..y * 3 + 3]);
        assert_eq!(&row[6..12], &[9, 8, 7, 9, 8, 7]);
    }
    // square images are left alone
    let sq = rgb(2, 2, vec![1; 12]);
    assert_eq!(pad_to_square(&sq, [0, 0, 0]), sq);
}

#[test]
fn center_crop_takes_the_middle() {
    let p = only(json!({"do_center_crop": true, "crop_size": {"height": 2, "width": 2}}));
    let t = p.preprocess(&dynamic(&four_by_two())).unwrap();
    let (dims, v) = to_u8_vec(&t);
    assert_eq!(dims, vec![3, 2, 2]);
    // left = (4 - 2) // 2 = 1: columns 1 and 2
    assert_eq!(&v[0..4], &[10, 20, 11, 21]);
    assert_eq!(&v[4..8], &[110, 120, 111, 121]);
    assert_eq!(&v[8..12], &[210, 220, 211, 221]);
    // odd difference: crop 3 wide from 4 → left = 0
    let out = center_crop(&four_by_two(), 1, 3);
    assert_eq!(out.data, vec![0, 100, 200, 10, 110, 210, 20, 120, 220]);
}

#[test]
fn center_crop_pads_small_images_with_zeros() {
    // 2×2 image, crop 3 high × 4 wide: numpy pads ceil(1/2)=1 row on top, ceil(2/2)=1 column left,
    // then top = (2-3)//2 + 1 = 0, left = (2-4)//2 + 1 = 0.
    let img = rgb(2, 2, vec![1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]);
    let out = center_crop(&img, 3, 4);
    assert_eq!((out.width, out.height), (4, 3));
    let px: Vec<u8> = out.data.chunks_exact(3).map(|p| p[0]).collect();
    assert_eq!(px, vec![0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 0]);
}

#[test]
fn rescale_and_normalize_match_numpy_arithmetic() {
    let p = only(json!({"do_rescale": true, "do_normalize": true}));
    let img = rgb(2, 1, vec![0, 128, 255, 17, 200, 3]);
    let t = p.preprocess(&dynamic(&img)).unwrap();
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let mut want = Vec::new();
    for c in 0..3 {
        for px in img.data.chunks_exact(3) {
            let x = (f64::from(px[c]) * (1.0 / 255.0)) as f32;
            want.push((x - OPENAI_CLIP_MEAN[c] as f32) / OPENAI_CLIP_STD[c] as f32);
        }
    }
    assert_eq!(v, want);
    // spot values
    assert!((v[0] - (-1.7922626)).abs() < 1e-6, "{}", v[0]);
    let white_r = ((1.0f32) - 0.48145466) / 0.26862954;
    let p2 = only(json!({"do_rescale": true, "do_normalize": true}));
    let t2 = p2
        .preprocess(&dynamic(&rgb(1, 1, vec![255, 255, 255])))
        .unwrap();
    assert_eq!(
        t2.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0],
        white_r
    );
    // rescale only
    let p3 = only(json!({"do_rescale": true, "rescale_factor": 0.5}));
    let t3 = p3.preprocess(&dynamic(&rgb(1, 1, vec![3, 4, 5]))).unwrap();
    assert_eq!(
        t3.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![1.5, 2.0, 2.5]
    );
}

/// The 5×3 test image of the pinned Pillow outputs: value (i*37 + j*91 + c*53) % 256 at row i,
/// column j, channel c.
fn pil_src() -> RgbU8 {
    let mut data = Vec::new();
    for i in 0..3usize {
        for j in 0..5usize {
            for c in 0..3usize {
                data.push(((i * 37 + j * 91 + c * 53) % 256) as u8);
            }
        }
    }
    rgb(5, 3, data)
}

#[test]
fn resize_equals_pillow_exactly() {
    // np.array(Image.fromarray(src).resize((w, h), resample=f)), Pillow 13.0.0
    let cases: Vec<(usize, usize, i64, Vec<u8>)> = vec![
        (
            3,
            2,
            3,
            vec![
                51, 104, 162, 145, 141, 100, 79, 132, 191, 103, 156, 134, 94, 90, 113, 131, 184,
                144,
            ],
        ),
        (
            7,
            4,
            3,
            vec![
                0, 46, 99, 43, 95, 166, 122, 179, 159, 180, 246, 30, 51, 108, 88, 44, 96, 167, 111,
                164, 217, 17, 69, 121, 64, 129, 200, 149, 154, 197, 221, 95, 53, 78, 83, 109, 65,
                130, 198, 134, 187, 255, 48, 101, 160, 105, 170, 162, 152, 157, 135, 140, 14, 85,
                81, 86, 153, 106, 171, 180, 166, 219, 171, 71, 124, 193, 139, 191, 76, 127, 184,
                13, 0, 55, 108, 56, 113, 193, 140, 192, 126, 189, 242, 10,
            ],
        ),
        (
            3,
            2,
            2,
            vec![
                53, 106, 159, 139, 139, 103, 83, 136, 189, 99, 152, 136, 96, 96, 114, 129, 182, 144,
            ],
        ),
        (
            8,
            5,
            1,
            vec![
                0, 45, 90, 21, 70, 150, 99, 154, 182, 177, 255, 71, 127, 211, 26, 18, 73, 110, 55,
                104, 183, 119, 173, 208, 7, 53, 97, 28, 94, 178, 112, 158, 228, 218, 177, 96, 167,
                127, 29, 31, 77, 119, 62, 128, 216, 131, 181, 255, 31, 76, 129, 60, 141, 194, 139,
                177, 230, 224, 61, 114, 174, 11, 64, 58, 96, 149, 94, 175, 228, 159, 204, 255, 54,
                104, 180, 107, 173, 142, 158, 204, 86, 108, 67, 75, 61, 17, 133, 77, 123, 188, 141,
                207, 147, 182, 232, 95, 62, 116, 206, 131, 180, 101, 162, 217, 0, 24, 108, 43, 0,
                58, 170, 81, 136, 207, 165, 214, 86, 190, 244, 0,
            ],
        ),
        (
            2,
            3,
            5,
            vec![
                75, 128, 137, 77, 130, 139, 112, 121, 174, 114, 123, 176, 105, 158, 89, 107, 160,
                123,
            ],
        ),
        (
            4,
            3,
            0,
            vec![
                0, 53, 106, 91, 144, 197, 17, 70, 123, 108, 161, 214, 37, 90, 143, 128, 181, 234,
                54, 107, 160, 145, 198, 251, 74, 127, 180, 165, 218, 15, 91, 144, 197, 182, 235,
                32,
            ],
        ),
        (
            2,
            2,
            4,
            vec![110, 120, 131, 82, 135, 188, 80, 133, 100, 137, 190, 115],
        ),
    ];
    let src = pil_src();
    for (w, h, code, want) in cases {
        let filter = Resample::from_pil(code).unwrap();
        let got = pil_resize(&src, w, h, filter).unwrap();
        assert_eq!((got.width, got.height), (w, h));
        assert_eq!(got.data, want, "{w}×{h} filter {filter:?}");
    }
    // same size: untouched
    assert_eq!(pil_resize(&src, 5, 3, Resample::Bicubic).unwrap(), src);
}

/// Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width; the intermediate 8-bit rounding makes the order visible.
#[test]
fn resize_pass_order_matches_pillow() {
    let (w, h) = (6usize, 20usize);
    let mut data = Vec::new();
    for i in 0..h {
        for j in 0..w {
            for c in 0..3 {
                data.push(((i * 37 + j * 91 + c * 53 + (i * j) % 7 * 29) % 256) as u8);
            }
        }
    }
    let src = rgb(w, h, data);
    // 20 - 9 = 11 > 2 * (6 - 5): vertical first
    let vh = vec![
        45, 89, 124, 137, 157, 88, 80, 141, 145, 74, 92, 156, 145, 188, 153, 103, 153, 201, 125,
        83, 133, 128, 126, 121, 115, 114, 130, 77, 119, 186, 184, 160, 100, 150, 162, 97, 139, 134,
        124, 153, 95, 98, 177, 52, 80, 75, 68, 113, 142, 146, 94, 77, 141, 146, 84, 124, 152, 172,
        176, 125, 95, 144, 164, 135, 85, 126, 120, 130, 133, 116, 108, 130, 85, 135, 199, 181, 181,
        49, 144, 165, 113, 149, 136, 125, 151, 95, 108, 154, 54, 98, 95, 68, 110, 148, 149, 98, 86,
        144, 142, 97, 140, 149, 190, 69, 107, 90, 132, 170, 144, 94, 115, 110, 139, 147, 116, 102,
        130, 100, 146, 204, 156, 216, 65, 132, 138, 131, 167, 82, 114, 141, 95, 131, 121, 71, 126,
    ];
    assert_eq!(pil_resize(&src, 5, 9, Resample::Bicubic).unwrap().data, vh);
    // 20 - 17 = 3 > 2 * (6 - 4) is false: horizontal first
    let hv = vec![
        43, 96, 131, 123, 176, 98, 69, 122, 152, 148, 201, 126, 98, 119, 108, 100, 125, 120, 84,
        109, 162, 101, 123, 176, 108, 109, 162, 144, 86, 125, 122, 116, 104, 120, 121, 174, 110,
        163, 216, 118, 112, 153, 103, 144, 138, 54, 107, 160, 164, 217, 87, 164, 196, 87, 176, 65,
        98, 174, 43, 96, 200, 57, 75, 123, 106, 114, 124, 145, 126, 201, 97, 61, 52, 100, 130, 123,
        174, 101, 74, 127, 156, 149, 198, 130, 103, 120, 113, 105, 126, 125, 87, 109, 162, 107,
        124, 177, 109, 114, 167, 148, 87, 125, 129, 125, 107, 121, 126, 179, 115, 168, 120, 119,
        119, 161, 102, 144, 144, 54, 107, 160, 171, 218, 43, 170, 200, 84, 184, 67, 98, 186, 45,
        96, 198, 55, 83, 124, 108, 119, 121, 151, 132, 202, 85, 65, 54, 107, 132, 124, 177, 104,
        77, 130, 162, 147, 85, 138, 108, 121, 118, 111, 128, 131, 90, 108, 161, 112, 126, 179, 110,
        119, 172, 151, 87, 125, 135, 133, 109, 122, 131, 184, 120, 173, 119, 119, 126, 170, 100,
        144, 150, 54, 107, 160, 175, 228, 43, 178, 94, 79, 196, 43, 96, 198, 45, 98,
    ];
    assert_eq!(
        pil_resize(&src, 4, 17, Resample::Bilinear).unwrap().data,
        hv
    );
}

#[test]
fn box_downscale_rounds_half_up() {
    let img = rgb(2, 1, vec![10, 0, 255, 21, 1, 254]);
    let out = pil_resize(&img, 1, 1, Resample::Box).unwrap();
    assert_eq!(out.data, vec![16, 1, 255]);
}

#[test]
fn alpha_is_composited_on_white_like_pillow() {
    // Image.alpha_composite(white, img).convert("RGB"), Pillow 13.0.0
    let buf: ImageBuffer<Rgba<u8>, Vec<u8>> =
        ImageBuffer::from_raw(3, 1, vec![200, 100, 50, 128, 10, 20, 30, 0, 255, 0, 7, 1]).unwrap();
    let out = to_rgb(&DynamicImage::ImageRgba8(buf), true);
    assert_eq!(out.data, vec![227, 177, 152, 255, 255, 255, 255, 254, 254]);
    let la = image::GrayAlphaImage::from_raw(2, 1, vec![100, 200, 7, 50]).unwrap();
    assert_eq!(
        to_rgb(&DynamicImage::ImageLumaA8(la), true).data,
        vec![133, 133, 133, 206, 206, 206]
    );
    // without do_convert_rgb the alpha channel is dropped
    let buf: ImageBuffer<Rgba<u8>, Vec<u8>> =
        ImageBuffer::from_raw(1, 1, vec![200, 100, 50, 128]).unwrap();
    assert_eq!(
        to_rgb(&DynamicImage::ImageRgba8(buf), false).data,
        vec![200, 100, 50]
    );
    let gray = image::GrayImage::from_raw(1, 1, vec![77]).unwrap();
    assert_eq!(
        to_rgb(&DynamicImage::ImageLuma8(gray), true).data,
        vec![77, 77, 77]
    );
}

#[test]
fn config_defaults_and_forms() {
    let p = ImageProcessor::from_json(&json!({})).unwrap();
    assert_eq!(p, ImageProcessor::default());
    assert_eq!(
        p.size,
        ResizeTarget::ShortestEdge {
            shortest_edge: 224,
            longest_edge: None
        }
    );
    assert_eq!(p.crop_size, (224, 224));
    assert_eq!(p.resample, Resample::Bicubic);
    assert!(!p.do_pad);
    assert_eq!(p.output_size(), Some((224, 224)));

    // openai/clip-vit-base-patch32 style: ints, feature extractor type
    let p = ImageProcessor::from_json(&json!({
        "crop_size": 224, "do_center_crop": true, "do_normalize": true, "do_resize": true,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25], "resample": 2, "size": 256
    }))
    .unwrap();
    assert_eq!(
        p.size,
        ResizeTarget::ShortestEdge {
            shortest_edge: 256,
            longest_edge: None
        }
    );
    assert_eq!(p.crop_size, (224, 224));
    assert_eq!(p.resample, Resample::Bilinear);
    assert_eq!(p.image_std, [0.25; 3]);

    // llava-1.5 style
    let p = ImageProcessor::from_json(&json!({
        "image_processor_type": "LlavaImageProcessor", "do_pad": true,
        "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}
    }))
    .unwrap();
    assert!(p.do_pad);
    assert_eq!(p.output_size(), Some((336, 336)));
    // without the crop, the padded square still fixes the size; without the padding it does not
    let mut q = p.clone();
    q.do_center_crop = false;
    assert_eq!(q.output_size(), Some((336, 336)));
    q.do_pad = false;
    assert_eq!(q.output_size(), None);

    // exact size without crop
    let p = ImageProcessor::from_json(
        &json!({"size": {"height": 20, "width": 30}, "do_center_crop": false}),
    )
    .unwrap();
    assert_eq!(p.output_size(), Some((20, 30)));

    // unknown type with CLIP-like keys: accepted
    assert!(ImageProcessor::from_json(
        &json!({"image_processor_type": "SiglipImageProcessor", "size": 3})
    )
    .is_ok());
}

#[test]
fn config_errors_name_the_key() {
    let cases = [
        (json!({"resample": 9}), "resample"),
        (json!({"size": {"longest": 3}}), "size"),
        (json!({"size": "big"}), "size"),
        (json!({"crop_size": {"height": 3}}), "crop_size"),
        (json!({"image_mean": [0.1, 0.2]}), "image_mean"),
        (json!({"do_resize": "yes"}), "do_resize"),
        (json!({"image_std": [0.0, 1.0, 1.0]}), "image_std"),
        (
            json!({"image_grid_pinpoints": [[336, 672]]}),
            "image_grid_pinpoints",
        ),
        (
            json!({"image_processor_type": "WhisperFeatureExtractor", "feature_size": 80}),
            "image_processor_type",
        ),
    ];
    for (cfg, key) in cases {
        let err = format!("{:#}", ImageProcessor::from_json(&cfg).unwrap_err());
        assert!(err.contains(key), "{cfg}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preprocessor_config.json");
    std::fs::write(&path, r#"{"resample": "bicubic"}"#).unwrap();
    let err = format!("{:#}", ImageProcessor::from_file(&path).unwrap_err());
    assert!(
        err.contains("preprocessor_config.json") && err.contains("resample"),
        "{err}"
    );
    let missing = dir.path().join("nope.json");
    let err = format!("{:#}", ImageProcessor::from_file(&missing).unwrap_err());
    assert!(err.contains("nope.json"), "{err}");
}

#[test]
fn shortest_edge_resize_sizes() {
    let p = ImageProcessor::from_json(&json!({"size": {"shortest_edge": 30}})).unwrap();
    assert_eq!(p.resize_output_size(40, 100).unwrap(), (30, 75));
    assert_eq!(p.resize_output_size(100, 40).unwrap(), (75, 30));
    assert_eq!(p.resize_output_size(33, 47).unwrap(), (30, 42)); // int(30 * 47 / 33) = 42
    assert_eq!(p.resize_output_size(30, 30).unwrap(), (30, 30));
    let p = ImageProcessor::from_json(&json!({"size": {"shortest_edge": 30, "longest_edge": 50}}))
        .unwrap();
    assert_eq!(p.resize_output_size(40, 100).unwrap(), (20, 50));
}

#[test]
fn full_pipeline_shapes_and_batch() {
    let p = ImageProcessor::from_json(&json!({
        "image_processor_type": "LlavaImageProcessor", "do_pad": true,
        "size": {"shortest_edge": 6}, "crop_size": {"height": 6, "width": 6}
    }))
    .unwrap();
    let a = dynamic(&pil_src());
    let b = dynamic(&four_by_two());
    let t = p.preprocess(&a).unwrap();
    assert_eq!(t.dims(), &[3, 6, 6]);
    assert_eq!(t.dtype(), DType::F32);
    let batch = p.preprocess_batch(&[a, b]).unwrap();
    assert_eq!(batch.dims(), &[2, 3, 6, 6]);
    let first = batch.get(0).unwrap();
    assert_eq!(
        first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert!(p.preprocess_batch(&[]).is_err());
    // a shortest-edge resize without crop cannot batch different aspect ratios
    let q = only(json!({"do_resize": true, "size": {"shortest_edge": 4}}));
    assert!(q
        .preprocess_batch(&[dynamic(&pil_src()), dynamic(&rgb(2, 2, vec![0; 12]))])
        .is_err());
    // the integer stage equals what preprocess() rescales
    let u = p.preprocess_u8(&dynamic(&pil_src())).unwrap();
    assert_eq!((u.width, u.height), (6, 6));
    let plain = only(json!({}));
    let t2 = plain.preprocess(&dynamic(&u)).unwrap();
    assert_eq!(to_u8_vec(&t2).1, planes(&u));
}

#[test]
fn load_image_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.png");
    let err = format!("{:#}", load_image(&missing).unwrap_err());
    assert!(
        err.contains("missing.png") && err.contains("does not exist"),
        "{err}"
    );

    let text = dir.path().join("notes.png");
    std::fs::write(&text, "this is not an image\n").unwrap();
    let err = format!("{:#}", load_image(&text).unwrap_err());
    assert!(
        err.contains("notes.png") && err.contains("PNG, JPEG"),
        "{err}"
    );

    let truncated = dir.path().join("truncated.png");
    let mut png = Vec::new();
    dynamic(&pil_src())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let err = format!("{:#}", load_image(&truncated).unwrap_err());
    assert!(
        err.contains("truncated.png") && err.contains("fetch or save it again"),
        "{err}"
    );

    // A PNG whose header claims 20000×20000 pixels (400 Mpixel): refused before decoding.
    let mut huge = png.clone();
    huge[16..20].copy_from_slice(&20000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&20000u32.to_be_bytes());
    let crc = common::crc32(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    let big = dir.path().join("big.png");
    std::fs::write(&big, &huge).unwrap();
    let err = format!("{:#}", load_image(&big).unwrap_err());
    assert!(
        err.contains("big.png") && err.contains("too large"),
        "{err}"
    );
    const _: () = assert!(20000u64 * 20000 > MAX_IMAGE_PIXELS);
    // A 108 Mpixel phone photograph is within the limit (Pillow opens it): this header is
    // refused for its missing data, not its size.
    huge[16..20].copy_from_slice(&12000u32.to_be_bytes());
    huge[20..24].copy_from_slice(&9000u32.to_be_bytes());
    let crc = common::crc32(&huge[12..29]);
    huge[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(&big, &huge).unwrap();
    let err = format!("{:#}", load_image(&big).unwrap_err());
    assert!(
        err.contains("big.png") && !err.contains("too large"),
        "{err}"
    );

    let ok = dir.path().join("ok.png");
    std::fs::write(&ok, &png).unwrap();
    let img = load_image(&ok).unwrap();
    assert_eq!(to_rgb(&img, true), pil_src());
    let err = format!("{:#}", load_image(dir.path()).unwrap_err());
    assert!(err.contains("directory"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Parity with the reference fixtures written by `transformers` (tests/fixtures).

fn image(name: &str) -> DynamicImage {
    load_image(&fixture(&format!("images/{name}"))).unwrap()
}

#[test]
fn clip_pixel_values_equal_transformers() {
    let p = ImageProcessor::from_file(&fixture("clip-tiny/preprocessor_config.json")).unwrap();
    let r = reference("clip");
    let got = p
        .preprocess_batch(&[image("square.png"), image("wide.png")])
        .unwrap();
    let want = &r["vision.pixel_values"];
    let d = max_abs_diff(&got, want);
    assert_eq!(d, 0.0, "clip square+wide pixel values differ by {d}");
    let got = p.preprocess_batch(&[image("photo.png")]).unwrap();
    let d = max_abs_diff(&got, &r["photo.pixel_values"]);
    assert_eq!(d, 0.0, "clip photo pixel values differ by {d}");
}

#[test]
fn from_dir_reads_both_layouts_and_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", ImageProcessor::from_dir(dir.path()).unwrap_err());
    assert!(err.contains("preprocessor_config.json"), "{err}");
    std::fs::write(
        dir.path().join("processor_config.json"),
        json!({"image_processor": {"do_pad": true, "image_processor_type": "LlavaImageProcessor", "size": {"shortest_edge": 7}, "crop_size": 7}, "patch_size": 7}).to_string(),
    )
    .unwrap();
    let p = ImageProcessor::from_dir(dir.path()).unwrap();
    assert!(p.do_pad);
    assert_eq!(p.output_size(), Some((7, 7)));
    // Both: the nested entry, as transformers 5 reads them ("nested config if found -> image
    // processor config"; a repository re-saved with 5.x keeps its old file).
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        json!({"size": 5, "crop_size": 5}).to_string(),
    )
    .unwrap();
    let p = ImageProcessor::from_dir(dir.path()).unwrap();
    assert!(p.do_pad);
    assert_eq!(p.output_size(), Some((7, 7)));
    // A processor_config.json without the entry: the file.
    std::fs::write(
        dir.path().join("processor_config.json"),
        json!({"patch_size": 7}).to_string(),
    )
    .unwrap();
    let p = ImageProcessor::from_dir(dir.path()).unwrap();
    assert!(!p.do_pad);
    assert_eq!(p.output_size(), Some((5, 5)));
}

#[test]
fn llava_pixel_values_equal_transformers() {
    let r = reference("llava");
    for dir in ["llava-tiny-hub", "llava-tiny-v5"] {
        let p = ImageProcessor::from_dir(&fixture(dir)).unwrap();
        assert!(p.do_pad, "{dir}: do_pad");
        let got = p
            .preprocess(&image("wide.png"))
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = &r["image.pixel_values"];
        assert_eq!(max_abs_diff(&got, want), 0.0, "{dir}: wide.png");
        for (key, file) in [
            ("preprocess.photo", "photo.png"),
            ("preprocess.square", "square.png"),
        ] {
            if let Some(want) = r.get(key) {
                let got = p.preprocess(&image(file)).unwrap();
                let got = if want.rank() == 4 {
                    got.unsqueeze(0).unwrap()
                } else {
                    got
                };
                assert_eq!(max_abs_diff(&got, want), 0.0, "{dir}: {file}");
            }
        }
    }
}

/// The server keeps uploads as `into_rgb8` makes them (3 bytes a pixel instead of up to 8):
/// preprocessing that gives exactly what preprocessing the decoded image gives.
#[test]
fn the_kept_rgb8_preprocesses_exactly_like_the_decoded_image() {
    let p = ImageProcessor::from_json(&json!({
        "do_resize": true, "size": {"shortest_edge": 7}, "do_center_crop": true,
        "crop_size": {"height": 7, "width": 7}, "do_pad": true,
        "image_processor_type": "LlavaImageProcessor"
    }))
    .unwrap();
    let rgba = ImageBuffer::from_fn(9, 5, |x, y| {
        Rgba([(x * 28) as u8, (y * 50) as u8, 90, (x * 31 + y * 7) as u8])
    });
    let rgb16 = ImageBuffer::from_fn(5, 9, |x, y| {
        Rgb([(x * 13_000) as u16, (y * 7_000) as u16, 40_000u16])
    });
    for img in [
        DynamicImage::ImageRgba8(rgba),
        DynamicImage::ImageRgb16(rgb16),
        DynamicImage::ImageLumaA8(ImageBuffer::from_fn(6, 6, |x, y| {
            image::LumaA([(x * 40) as u8, (y * 40) as u8])
        })),
    ] {
        let direct = p.preprocess_u8(&img).unwrap();
        let kept = DynamicImage::ImageRgb8(p.into_rgb8(img).unwrap());
        assert_eq!(p.preprocess_u8(&kept).unwrap(), direct);
    }
}

#[test]
fn webp_and_gif_uploads_decode_to_the_pixels_they_hold() {
    // Few colours, so that GIF's palette holds every one of them exactly.
    let mut src = image::RgbImage::new(23, 17);
    for (x, y, p) in src.enumerate_pixels_mut() {
        *p =
            image::Rgb([[200, 30, 30], [10, 10, 220], [250, 250, 250]][((x + 2 * y) % 3) as usize]);
    }
    for format in [image::ImageFormat::WebP, image::ImageFormat::Gif] {
        let mut bytes = std::io::Cursor::new(Vec::new());
        src.write_to(&mut bytes, format).unwrap();
        let bytes = bytes.into_inner();
        let decoded = decode_image(&bytes, "upload", u64::MAX).unwrap().to_rgb8();
        assert_eq!(decoded, src, "{format:?}");
        // Cut short: refused, never a partial image.
        let err = decode_image(&bytes[..bytes.len() * 3 / 4], "upload", u64::MAX).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot decode image upload"),
            "{format:?}: {err:#}"
        );
    }
}

fn encode_with_exif(img: &image::RgbImage, format: image::ImageFormat, exif: Vec<u8>) -> Vec<u8> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    let (w, h) = img.dimensions();
    let layout = image::ExtendedColorType::Rgb8;
    match format {
        image::ImageFormat::Png => {
            let mut e = image::codecs::png::PngEncoder::new(&mut bytes);
            e.set_exif_metadata(exif).unwrap();
            e.write_image(img, w, h, layout).unwrap();
        }
        image::ImageFormat::Jpeg => {
            let mut e = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
            e.set_exif_metadata(exif).unwrap();
            e.write_image(img, w, h, layout).unwrap();
        }
        other => unreachable!("{other:?}"),
    }
    bytes
}

#[test]
fn decoding_an_image_is_counted_in_its_own_depth_with_a_quarter_turns_copy() {
    use image::ExtendedColorType::{La8, Rgb8, Rgba16, Rgba8, L8};
    // 10 × 6 = 60 pixels. Decoded bytes (as the decoder gives them)
    // beside the larger of the turned copy and the 8-bit RGB copy (none for 8-bit RGB).
    for (layout, orientation, bytes) in [
        (Rgb8, 1, 60 * 3),
        (Rgb8, 3, 60 * 3),          // half a turn: in place
        (Rgb8, 6, 60 * 3 + 60 * 3), // a quarter: a turned copy
        (L8, 1, 60 + 60 * 3),       // grey, then its RGB copy
        (La8, 8, 60 * 2 + 60 * 3),  // the RGB copy is the larger
        (Rgba8, 1, 60 * 4 + 60 * 3),
        (Rgba16, 1, 60 * 8 + 60 * 3),
        (Rgba16, 5, 60 * 8 + 60 * 8), // the turned copy is the larger
    ] {
        let png = png_of(layout, (10, 6), orientation);
        assert_eq!(
            decoding_bytes(&png, "upload.png").unwrap(),
            bytes,
            "{layout:?}, orientation {orientation}"
        );
    }
    // A JPEG is 8-bit RGB (or grey); its EXIF block is read from its header.
    let rgb = image::RgbImage::new(10, 6);
    let jpeg = encode_with_exif(&rgb, image::ImageFormat::Jpeg, exif_orientation(6));
    assert_eq!(decoding_bytes(&jpeg, "photo.jpg").unwrap(), 360);
    // A progressive one (its frame marked SOF2) keeps 2 bytes a pixel of each of its 3
    // components' coefficients beside the pixels until its last scan, then 1 of its plane.
    let mut progressive = encode_with_exif(&rgb, image::ImageFormat::Jpeg, exif_orientation(1));
    let sof = progressive
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .unwrap();
    progressive[sof + 1] = 0xC2;
    assert_eq!(
        decoding_bytes(&progressive, "p.jpg").unwrap(),
        60 * 3 + 60 * 9
    );
    // A GIF decodes its first frame at the frame's own size, whatever its header (screen) says:
    // a 40 × 30 frame behind a 4 × 4 screen holds 4 bytes a pixel of both.
    let mut gif = Vec::new();
    image::RgbaImage::new(40, 30)
        .write_to(&mut std::io::Cursor::new(&mut gif), image::ImageFormat::Gif)
        .unwrap();
    gif[6..10].copy_from_slice(&[4, 0, 4, 0]);
    assert_eq!(
        decoding_bytes(&gif, "lying.gif").unwrap(),
        16 * 4 + 1200 * 4
    );
    // And the frame, not the screen, meets the pixel limit.
    let err = format!("{:#}", decode_image(&gif, "lying.gif", 100).unwrap_err());
    assert!(err.contains("40×30"), "{err}");
}

/// The stored pixel shown at (x, y) of the upright image, for a stored image `w` × `h` with EXIF
/// orientation `o`, from the EXIF specification's table (the stored row 0 / column 0 is shown at
/// the top-left (1), top-right (2), bottom-right (3), bottom-left (4), left-top (5), right-top
/// (6), right-bottom (7), left-bottom (8)).
fn stored_position(o: u16, (w, h): (u32, u32), (x, y): (u32, u32)) -> (u32, u32) {
    match o {
        1 => (x, y),
        2 => (w - 1 - x, y),
        3 => (w - 1 - x, h - 1 - y),
        4 => (x, h - 1 - y),
        5 => (y, x),
        6 => (y, h - 1 - x),
        7 => (w - 1 - y, h - 1 - x),
        8 => (w - 1 - y, x),
        _ => unreachable!(),
    }
}

#[test]
fn exif_orientation_turns_the_image_upright_like_transformers_load_image() {
    // Every pixel distinct, so that any wrong turn or mirror shows.
    let stored = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([40 * x as u8, 80 * y as u8, 7]));
    for o in 1..=8u16 {
        let png = encode_with_exif(&stored, image::ImageFormat::Png, exif_orientation(o));
        let upright = decode_image(&png, "photo.png", u64::MAX).unwrap().to_rgb8();
        let expected_dims = if o >= 5 { (3, 5) } else { (5, 3) };
        assert_eq!(upright.dimensions(), expected_dims, "orientation {o}");
        for (x, y, p) in upright.enumerate_pixels() {
            let (sx, sy) = stored_position(o, (5, 3), (x, y));
            assert_eq!(p, stored.get_pixel(sx, sy), "orientation {o} at ({x}, {y})");
        }
    }
    // A phone's portrait JPEG: stored sideways, tagged "rotate 90° clockwise" (6). It decodes to
    // the untagged file's pixels turned, so a loaded file and an upload agree.
    let big = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([4 * x as u8, 5 * y as u8, 90]));
    let tagged = encode_with_exif(&big, image::ImageFormat::Jpeg, exif_orientation(6));
    let plain = encode_with_exif(&big, image::ImageFormat::Jpeg, exif_orientation(1));
    let plain = decode_image(&plain, "plain.jpg", u64::MAX)
        .unwrap()
        .to_rgb8();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portrait.jpg");
    std::fs::write(&path, &tagged).unwrap();
    let upright = load_image(&path).unwrap().to_rgb8();
    assert_eq!(upright.dimensions(), (48, 64));
    for (x, y, p) in upright.enumerate_pixels() {
        assert_eq!(p, plain.get_pixel(y, 47 - x), "({x}, {y})");
    }
    // JPEG's "Exif\0\0" header kept in a PNG or WebP chunk, as some writers do.
    let mut prefixed = b"Exif\0\0".to_vec();
    prefixed.extend(exif_orientation(8));
    let png = encode_with_exif(&stored, image::ImageFormat::Png, prefixed);
    let upright = decode_image(&png, "prefixed.png", u64::MAX)
        .unwrap()
        .to_rgb8();
    assert_eq!(upright.get_pixel(0, 0), stored.get_pixel(4, 0));
    // The tag stored as LONG rather than SHORT (Pillow reads it), big-endian this time.
    let mut long = b"MM\0*".to_vec();
    long.extend_from_slice(&8u32.to_be_bytes());
    long.extend_from_slice(&1u16.to_be_bytes());
    long.extend_from_slice(&0x0112u16.to_be_bytes());
    long.extend_from_slice(&4u16.to_be_bytes()); // LONG
    long.extend_from_slice(&1u32.to_be_bytes());
    long.extend_from_slice(&6u32.to_be_bytes());
    long.extend_from_slice(&0u32.to_be_bytes());
    let png = encode_with_exif(&stored, image::ImageFormat::Png, long);
    let upright = decode_image(&png, "long.png", u64::MAX).unwrap().to_rgb8();
    assert_eq!(upright.dimensions(), (3, 5));
    assert_eq!(upright.get_pixel(0, 0), stored.get_pixel(0, 2));
    // An eXIf chunk after the image data, before IEND (Pillow finds it there too).
    let plain = encode_with_exif(&stored, image::ImageFormat::Png, Vec::new());
    let exif = exif_orientation(8);
    let mut chunk = (exif.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"eXIf");
    chunk.extend_from_slice(&exif);
    let crc = common::crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    let iend = plain.len() - 12;
    let late = [&plain[..iend], &chunk, &plain[iend..]].concat();
    let upright = decode_image(&late, "late.png", u64::MAX).unwrap().to_rgb8();
    assert_eq!(upright.get_pixel(0, 0), stored.get_pixel(4, 0));
    // An orientation tag out of range leaves the image as stored.
    let odd = encode_with_exif(&stored, image::ImageFormat::Png, exif_orientation(9));
    assert_eq!(
        decode_image(&odd, "odd.png", u64::MAX).unwrap().to_rgb8(),
        stored
    );
}

/// An uncompressed little-endian RGB TIFF of `img` whose first IFD holds Orientation = `o`.
fn tiff_with_orientation(img: &image::RgbImage, o: u16) -> Vec<u8> {
    let (w, h) = img.dimensions();
    let entries: [(u16, u16, u32); 10] = [
        (256, 3, w),            // ImageWidth, SHORT
        (257, 3, h),            // ImageLength
        (258, 3, 134),          // BitsPerSample: 3 values, at 134
        (259, 3, 1),            // Compression: none
        (262, 3, 2),            // PhotometricInterpretation: RGB
        (273, 4, 140),          // StripOffsets, LONG
        (274, 3, u32::from(o)), // Orientation
        (277, 3, 3),            // SamplesPerPixel
        (278, 3, h),            // RowsPerStrip: one strip
        (279, 4, w * h * 3),    // StripByteCounts
    ];
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    for (tag, kind, value) in entries {
        tiff.extend_from_slice(&tag.to_le_bytes());
        tiff.extend_from_slice(&kind.to_le_bytes());
        tiff.extend_from_slice(&(if tag == 258 { 3u32 } else { 1 }).to_le_bytes());
        if kind == 3 && tag != 258 {
            tiff.extend_from_slice(&(value as u16).to_le_bytes());
            tiff.extend_from_slice(&[0, 0]);
        } else {
            tiff.extend_from_slice(&value.to_le_bytes());
        }
    }
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    assert_eq!(tiff.len(), 134);
    for _ in 0..3 {
        tiff.extend_from_slice(&8u16.to_le_bytes());
    }
    tiff.extend_from_slice(img.as_raw());
    tiff
}

#[test]
fn a_tiff_orientation_tag_turns_the_image_upright_like_pillow() {
    // Pillow turns a TIFF upright by its Orientation tag when it loads it (`load_end` calls
    // `exif_transpose`), so `transformers` sees it upright.
    let stored = image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([40 * x as u8, 80 * y as u8, 7]));
    for o in 1..=8u16 {
        let tiff = tiff_with_orientation(&stored, o);
        let upright = decode_image(&tiff, "scan.tiff", u64::MAX)
            .unwrap()
            .to_rgb8();
        let expected_dims = if o >= 5 { (3, 5) } else { (5, 3) };
        assert_eq!(upright.dimensions(), expected_dims, "orientation {o}");
        for (x, y, p) in upright.enumerate_pixels() {
            let (sx, sy) = stored_position(o, (5, 3), (x, y));
            assert_eq!(p, stored.get_pixel(sx, sy), "orientation {o} at ({x}, {y})");
        }
    }
}

#[test]
fn a_long_narrow_image_is_resized_and_cropped_like_pillow_would() {
    // 250:1: the shortest-edge resize makes it 224 × 56 000 before the crop.
    let p = ImageProcessor::from_json(&json!({"size": 224, "crop_size": 224})).unwrap();
    let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(8, 2000, |_, y| {
        image::Rgb([(y % 256) as u8, 40, 200])
    }));
    let t = p.preprocess(&img).unwrap();
    assert_eq!(t.dims(), &[3, 224, 224]);
}

#[test]
fn the_working_memory_of_preprocessing_is_known_before_it_is_taken() {
    // LLaVA-1.5: pad to a square, resize its shortest edge to 336, crop 336.
    let p = ImageProcessor::from_json(&json!({
        "image_processor_type": "LlavaImageProcessor", "do_pad": true,
        "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}
    }))
    .unwrap();
    // 640×480: padded and resized row by row, no square held: the image, the resampler's
    // 336×640 intermediate and the 336² output; 3 bytes a pixel.
    assert_eq!(
        p.working_bytes(640, 480).unwrap(),
        (307_200 + 215_040 + 112_896) * 3
    );
    // A 32768×20 strip pads to a gigapixel square, which is never held: 35 MB, answered.
    assert_eq!(
        p.working_bytes(32768, 20).unwrap(),
        (655_360 + 32768 * 336 + 112_896) * 3
    );
    let strip = DynamicImage::ImageRgb8(image::RgbImage::new(32768, 20));
    assert_eq!(p.preprocess(&strip).unwrap().dims(), &[3, 336, 336]);
    // Padding alone would hold the square: refused before any allocation.
    let pad_only = ImageProcessor::from_json(&json!({
        "image_processor_type": "LlavaImageProcessor", "do_pad": true, "do_resize": false,
        "do_center_crop": false
    }))
    .unwrap();
    let err = format!("{:#}", pad_only.working_bytes(32768, 20).unwrap_err());
    assert!(err.contains("padding a 32768×20 image"), "{err}");
    assert!(pad_only.preprocess(&strip).is_err());
}

/// BMP and TIFF files (scanners, microscopes, Windows) read as the same pixels as a PNG of them
/// (Pillow reads them, so `transformers` takes them).
#[test]
fn bmp_and_tiff_read_as_the_same_pixels_as_png() {
    let dir = tempfile::tempdir().unwrap();
    let src = dynamic(&pil_src());
    let mut read = Vec::new();
    for (name, format) in [
        ("a.png", image::ImageFormat::Png),
        ("a.bmp", image::ImageFormat::Bmp),
        ("a.tiff", image::ImageFormat::Tiff),
    ] {
        let path = dir.path().join(name);
        src.save_with_format(&path, format).unwrap();
        let img = load_image(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        read.push(to_rgb(&img, true).data);
    }
    assert_eq!(read[0], to_rgb(&src, true).data);
    assert!(read.iter().all(|r| *r == read[0]));
}

/// Padding to a square and resizing in one pass gives exactly what padding then resizing gives
/// (Pillow's, above), for wide and tall images, every filter, shrinking and growing.
#[test]
fn pad_and_resize_equals_padding_then_resizing() {
    use bella_vqa::models::image::pad_and_resize;
    let mut seed = 7u32;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 24) as u8
            })
            .collect()
    };
    let bg = [122, 116, 104];
    for (w, h) in [
        (97, 13),
        (13, 97),
        (40, 39),
        (5, 2),
        (300, 41),
        (2, 301),
        (1, 160),
    ] {
        let img = rgb(w, h, noise(w * h * 3));
        for filter in [
            Resample::Nearest,
            Resample::Lanczos,
            Resample::Bilinear,
            Resample::Bicubic,
            Resample::Box,
            Resample::Hamming,
        ] {
            for (ow, oh) in [(24, 24), (150, 150), (30, 20), (w.max(h), w.max(h))] {
                let expected = pil_resize(&pad_to_square(&img, bg), ow, oh, filter).unwrap();
                let got = pad_and_resize(&img, bg, ow, oh, filter).unwrap();
                assert_eq!(
                    (got.width, got.height),
                    (expected.width, expected.height),
                    "{w}×{h} → {ow}×{oh} {filter:?}"
                );
                assert!(got.data == expected.data, "{w}×{h} → {ow}×{oh} {filter:?}");
            }
        }
    }
}

/// `png` with an `iCCP` chunk holding `profile` (zlib), placed after IHDR as encoders place it.
fn png_with_profile(png: &[u8], profile: &[u8]) -> Vec<u8> {
    let mut data = b"p\0\0".to_vec(); // name, its terminator, compression method 0
    data.extend(miniz_oxide::deflate::compress_to_vec_zlib(profile, 9));
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"iCCP");
    chunk.extend_from_slice(&data);
    let crc = common::crc32(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    [&png[..33], &chunk, &png[33..]].concat()
}

#[test]
fn a_colour_profile_past_pillows_limit_is_refused_before_it_is_unpacked() {
    use bella_vqa::models::image::image_file_size;
    let mut png = Vec::new();
    dynamic(&pil_src())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Pillow unpacks at most MAX_TEXT_CHUNK (1 MiB) of a profile: exactly that is read…
    let fits = png_with_profile(&png, &vec![7u8; 1 << 20]);
    assert_eq!(
        to_rgb(&decode_image(&fits, "fits.png", u64::MAX).unwrap(), true),
        pil_src()
    );
    let fits_file = dir.path().join("fits.png");
    std::fs::write(&fits_file, &fits).unwrap();
    let (w, h) = image_file_size(&fits_file).unwrap();
    assert_eq!(
        (w as usize, h as usize),
        (pil_src().width, pil_src().height)
    );
    // …one byte more is refused ("Decompressed Data Too Large"), by the header check too: a
    // ~2 KB file that would unpack to 2 MiB here, to gigabytes in the wild.
    let bomb = png_with_profile(&png, &vec![0u8; (1 << 20) + 1]);
    let bomb_file = dir.path().join("bomb.png");
    std::fs::write(&bomb_file, &bomb).unwrap();
    for err in [
        decode_image(&bomb, "bomb.png", u64::MAX).unwrap_err(),
        load_image(&bomb_file).unwrap_err(),
        image_file_size(&bomb_file).unwrap_err(),
    ] {
        let err = format!("{err:#}");
        assert!(
            err.contains("bomb.png") && err.contains("colour profile") && err.contains("1 MiB"),
            "{err}"
        );
    }
}

#[test]
fn files_people_give_as_images_are_named_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let ftyp = |brand: &[u8]| [b"\0\0\0\x18ftyp".as_slice(), brand, &[0; 12]].concat();
    for (bytes, kind) in [
        (ftyp(b"heic"), "a HEIC/HEIF photograph"), // an iPhone's photograph
        (ftyp(b"mif1"), "a HEIC/HEIF photograph"),
        (ftyp(b"avif"), "an AVIF image"),
        (ftyp(b"isom"), "a video (MP4/QuickTime)"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec(), "a PDF document"),
        (
            b"<?xml version=\"1.0\"?>\n<!-- drawn by hand -->\n<svg xmlns=\"http://www.w3.org/2000/svg\"/>"
                .to_vec(),
            "an SVG drawing",
        ),
    ] {
        refused_by_every_reader(
            &bytes,
            &dir.path().join("upload"),
            &format!("upload is {kind}, which bella-vqa cannot read"),
            "convert it to PNG or JPEG",
        );
    }
}

/// Decoding `bytes`, loading them from `file` and reading their size from it are all refused
/// with a message that contains `says` and ends with `ending`.
fn refused_by_every_reader(bytes: &[u8], file: &Path, says: &str, ending: &str) {
    std::fs::write(file, bytes).unwrap();
    let name = file.file_name().unwrap().to_str().unwrap();
    for err in [
        decode_image(bytes, name, u64::MAX).unwrap_err(),
        load_image(file).unwrap_err(),
        bella_vqa::models::image::image_file_size(file).unwrap_err(),
    ] {
        let err = format!("{err:#}");
        assert!(err.contains(says) && err.ends_with(ending), "{err}");
    }
}

#[test]
fn jpegs_of_a_kind_the_decoder_cannot_read_are_named_by_kind() {
    // An ordinary 8-bit baseline JPEG, then its start-of-frame patched to the kinds people meet:
    // 12-bit (medical and raw-converter exports), arithmetic-coded, lossless.
    let mut bytes = Vec::new();
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(8, 8, Rgb([200u8, 30, 30])));
    image
        .write_with_encoder(image::codecs::jpeg::JpegEncoder::new(&mut bytes))
        .unwrap();
    let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scan.jpg");
    decode_image(&bytes, "scan.jpg", u64::MAX).unwrap();
    for (marker, precision, kind) in [
        (0xC1, 12, "a 12-bit JPEG"),
        (0xC9, 8, "an arithmetic-coded JPEG"),
        (0xC3, 8, "a lossless JPEG"),
    ] {
        let mut patched = bytes.clone();
        patched[sof + 1] = marker;
        patched[sof + 4] = precision;
        refused_by_every_reader(
            &patched,
            &file,
            &format!("scan.jpg is {kind}, which this reader does not support"),
            "convert it to PNG or to an ordinary 8-bit JPEG",
        );
    }
}
