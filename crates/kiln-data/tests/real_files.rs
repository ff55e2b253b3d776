//! The real Fashion-MNIST files, where installed. These skip (loudly) only when the data is
//! absent and `KILN_REQUIRE_DATA` is unset; `.ci/run` sets it, so CI cannot pass by skipping.

use kiln_data::{CLASS_NAMES, load, locate};

#[test]
fn real_fashion_mnist_has_the_published_shape() {
    let dir = match locate(None) {
        Ok(dir) => dir,
        Err(e) if std::env::var_os("KILN_REQUIRE_DATA").is_none() => {
            eprintln!("SKIPPED: real Fashion-MNIST test, data not found:\n{e}");
            return;
        }
        Err(e) => panic!("KILN_REQUIRE_DATA is set but the data is missing:\n{e}"),
    };
    let data = load(&dir).unwrap();
    assert_eq!(
        (data.train.count, data.train.rows, data.train.cols),
        (60_000, 28, 28)
    );
    assert_eq!(data.test.count, 10_000);
    assert_eq!(data.train.images.len(), 60_000 * 784);
    // Both splits are balanced: 6,000 and 1,000 examples of each class.
    for (split, per_class) in [(&data.train, 6_000), (&data.test, 1_000)] {
        let mut counts = [0usize; 10];
        for &l in &split.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [per_class; 10]);
    }
    // The first training and test images are ankle boots, as in the data set's own preview.
    assert_eq!(CLASS_NAMES[data.train.labels[0] as usize], "ankle boot");
    assert_eq!(CLASS_NAMES[data.test.labels[0] as usize], "ankle boot");
    // Pixels use the full u8 range and the first image is not blank.
    assert_eq!(data.train.images.iter().max(), Some(&255));
    assert!(data.train.image(0).iter().filter(|&&p| p > 0).count() > 100);
}
