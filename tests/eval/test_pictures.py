"""Gaze pictures are valid PNGs of the documented size, for images and videos."""

from PIL import Image

from evaluation.pictures import draw_gaze
from evaluation.runner import EvalConfig, evaluate_samples

# the documented layout: a 1.8 in panel per image/frame and generated token, a row per
# layer, 0.7 in of captions, at 100 dpi
PANEL_PX, CAPTION_PX = 180, 70


def documented_size(tokens: int, frames: int, layers: int) -> tuple[int, int]:
    return tokens * frames * PANEL_PX, layers * PANEL_PX + CAPTION_PX


def test_pictures_for_images_and_videos(tiny, samples, tmp_path):
    model, processor = tiny
    report = evaluate_samples(model, processor, samples, EvalConfig(top_k=1, max_new_tokens=3))
    sizes = {}
    for sample, result in zip(samples, report.samples, strict=True):
        path = draw_gaze(sample, result, tmp_path / f"{sample.id}.png", tokens=3)
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            shown = min(3, len(result.routing[0]))  # an answer may end before 3 tokens
            frames = 2 if sample.videos else 1
            assert image.size == documented_size(shown, frames, layers=2)
            assert image.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))
            sizes[sample.id] = image.size
    # one panel per frame: the two-frame video is twice as wide as an image, as tall
    assert sizes["vid0"][0] == 2 * sizes["img0"][0]
    assert sizes["vid0"][1] == sizes["img0"][1]


def test_picture_of_chosen_layer_only(tiny, samples, tmp_path):
    model, processor = tiny
    config = EvalConfig(top_k=1, max_new_tokens=2, routing_layers=[1])
    report = evaluate_samples(model, processor, samples[:1], config)
    assert list(report.samples[0].routing) == [1]
    path = draw_gaze(samples[0], report.samples[0], tmp_path / "one.png", tokens=2)
    with Image.open(path) as image:
        shown = min(2, len(report.samples[0].routing[1]))
        assert image.size == documented_size(shown, 1, layers=1)
