//! Several questions answered in one particle-folded pass give what each gives alone.

use std::path::PathBuf;

use bella_vqa::{load_image, AskOptions, BellaVqa, LoadOptions, ModelSource, Question, Sampling};

fn demo() -> BellaVqa {
    let llava = bella_vqa::demo::path(bella_vqa::demo::LLAVA).expect("demo model");
    let particles = bella_vqa::demo::path(bella_vqa::demo::PARTICLES).expect("demo particles");
    BellaVqa::load(
        &ModelSource::Dir(llava),
        Some(&particles),
        &LoadOptions::default(),
    )
    .expect("demo loads")
}

fn demo_image(name: &str) -> image::DynamicImage {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("eval/demo")
        .join(name);
    load_image(&path).expect("demo image")
}

#[test]
fn a_batch_answers_each_question_as_it_is_answered_alone() {
    let vqa = demo();
    let images = [
        demo_image("red-circle.png"),
        demo_image("two-blue-squares.png"),
        demo_image("photo-cat.png"),
        demo_image("three-shapes.png"),
    ];
    // Prompts of different lengths (left padding), in- and out-of-distribution images.
    let questions = [
        "What color is the circle?",
        "How many squares are there?",
        "What color is the circle?",
        "Is there a green triangle in the image?",
    ];
    let greedy = AskOptions::default();
    let sampled = AskOptions {
        sampling: Sampling::Sample {
            temperature: 0.8,
            top_p: 0.9,
            seed: 7,
        },
        ..AskOptions::default()
    };
    let mut batch = Vec::new();
    for (image, text) in images.iter().zip(questions) {
        batch.push(Question {
            image,
            text,
            options: &greedy,
        });
    }
    // The same questions again with sampling: a second group within the batch.
    for (image, text) in images.iter().zip(questions) {
        batch.push(Question {
            image,
            text,
            options: &sampled,
        });
    }
    // And a bad question, which fails alone.
    batch.push(Question {
        image: &images[0],
        text: "   ",
        options: &greedy,
    });
    let together = vqa.ask_batch(&batch);
    assert_eq!(together.len(), batch.len());
    let bad = together.last().expect("last").as_ref().unwrap_err();
    assert!(format!("{bad:#}").contains("empty"), "{bad:#}");
    for (q, got) in batch.iter().zip(&together).take(batch.len() - 1) {
        let got = got.as_ref().expect("answered");
        let alone = vqa.ask_with(q.image, q.text, q.options).expect("answered");
        assert_eq!(got.answer, alone.answer, "{}", q.text);
        assert_eq!(got.abstained, alone.abstained, "{}", q.text);
        let answers = |r: &bella_vqa::Response| -> Vec<String> {
            r.particles.iter().map(|p| p.answer.clone()).collect()
        };
        assert_eq!(answers(got), answers(&alone), "{}", q.text);
        assert!(
            (got.confidence - alone.confidence).abs() < 1e-4,
            "{}: {} vs {}",
            q.text,
            got.confidence,
            alone.confidence
        );
        assert!((got.uncertainty.epistemic - alone.uncertainty.epistemic).abs() < 1e-4);
        assert_eq!(got.prompt_tokens, alone.prompt_tokens);
        assert_eq!(got.generated_tokens, alone.generated_tokens);
    }
    // The photograph is out of distribution: the demo abstains there, and answers the others.
    assert!(together[2].as_ref().expect("answered").abstained);
    assert!(!together[0].as_ref().expect("answered").abstained);
}

#[test]
fn a_batch_larger_than_one_pass_answers_every_question_in_order() {
    let vqa = demo();
    let images = [
        demo_image("red-circle.png"),
        demo_image("purple-diamond.png"),
    ];
    let options = AskOptions {
        max_new_tokens: 4,
        ..AskOptions::default()
    };
    // More questions than one pass folds: they are answered in passes, each in its place.
    let n = bella_vqa::answer::MAX_FOLDED_QUESTIONS + 3;
    let batch: Vec<Question> = (0..n)
        .map(|i| Question {
            image: &images[i % 2],
            text: "What color is the shape?",
            options: &options,
        })
        .collect();
    let together = vqa.ask_batch(&batch);
    assert_eq!(together.len(), n);
    let alone: Vec<String> = images
        .iter()
        .map(|image| {
            vqa.ask_with(image, "What color is the shape?", &options)
                .expect("answered")
                .answer
        })
        .collect();
    assert_ne!(alone[0], alone[1], "the two images must be told apart");
    for (i, got) in together.iter().enumerate() {
        assert_eq!(
            got.as_ref().expect("answered").answer,
            alone[i % 2],
            "question {i}"
        );
    }
}

#[test]
fn a_batch_whose_askers_leave_stops_at_the_next_layer_and_the_model_answers_on() {
    use std::cell::Cell;
    let vqa = demo();
    let image = demo_image("red-circle.png");
    let opts = AskOptions::default();
    let batch = [
        Question {
            image: &image,
            text: "What color is the circle?",
            options: &opts,
        },
        Question {
            image: &image,
            text: "What shape is it?",
            options: &opts,
        },
    ];
    let answers = |results: Vec<anyhow::Result<bella_vqa::Response>>| -> Vec<bella_vqa::Response> {
        results.into_iter().map(|r| r.expect("answered")).collect()
    };
    let plain = answers(vqa.ask_batch(&batch));
    // A stop test that never fires changes nothing; it is asked throughout the answer.
    let asked = Cell::new(0usize);
    let stays = || {
        asked.set(asked.get() + 1);
        false
    };
    assert_eq!(answers(vqa.ask_batch_until(&batch, &stays)), plain);
    let whole = asked.get();

    // The askers leave while the prompt is computed (the 5th layer: past the demo's 3-layer
    // vision tower, in its language model): the rest of the answer is not computed, and both
    // questions say why.
    let asked = Cell::new(0usize);
    let after_stop = Cell::new(0usize);
    let leaves = || {
        asked.set(asked.get() + 1);
        if asked.get() > 5 {
            after_stop.set(after_stop.get() + 1);
        }
        asked.get() >= 5
    };
    let stopped = vqa.ask_batch_until(&batch, &leaves);
    assert_eq!(stopped.len(), 2);
    for result in &stopped {
        let e = result.as_ref().expect_err("stopped");
        assert!(e.is::<bella_vqa::cancel::Cancelled>(), "{e:#}");
        assert!(format!("{e}").contains("no longer waits"), "{e}");
    }
    // Stopped where the test first said so: asked once more only, to name the error.
    assert!(
        after_stop.get() <= 1,
        "asked {} times after",
        after_stop.get()
    );
    assert!(whole > asked.get() + 3, "a whole answer asks {whole} times");
    // Nothing of the stopped batch stays behind.
    assert_eq!(answers(vqa.ask_batch(&batch)), plain);
}
