"""Decoding, frame sampling, conversation conversion and the length policy (no Ray)."""

import io
import json

import av
import numpy as np
import pytest
from PIL import Image

from gazeattn import ops
from gazeattn.sample import EncodedSample
from gazeattn.video import EmptyVideo
from pipelines.config import DataConfig
from pipelines.conversation import add_dummy_image, to_messages
from pipelines.dataset import RAW_SCHEMA, decode_batch, decoded_media, fit_length
from pipelines.decode import BadSample, decode_image, decode_sample, decode_video, sample_indices
from pipelines.synthetic import write_mp4


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_decode_image_formats_keep_their_size(fmt):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    out = decode_image(encoded(image, fmt))
    assert out.shape == (20, 40, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - [200, 10, 10]).max() < 16
    bounded = decode_image(encoded(image, fmt), max_side=16)
    assert bounded.shape == (8, 16, 3)  # the longer side bounded, the aspect kept


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", encoded(Image.new("RGB", (64, 64)), "PNG")[:60]],
    ids=["empty", "junk", "cut"],
)
def test_corrupt_image_bytes(data):
    with pytest.raises(BadSample) as info:
        decode_image(data)
    assert info.value.reason == "bad_image"


def test_sample_indices_uniform():
    assert sample_indices(8, 4).tolist() == [1, 3, 5, 7]
    assert sample_indices(10, 1).tolist() == [5]
    assert sample_indices(2, 4).tolist() == [0, 0, 1, 1]  # too few frames: repeats, in order
    with pytest.raises(EmptyVideo, match="no frames"):
        sample_indices(0, 4)


def clip(n: int, size: int = 16) -> list[np.ndarray]:
    """Frame t is a flat grey of level 20 * t (recognisable after compression)."""
    return [np.full((size, size, 3), 20 * t, np.uint8) for t in range(n)]


def test_decode_video_samples_frames_uniformly():
    out = decode_video(write_mp4(clip(8)), frames=4)
    assert out.shape == (4, 16, 16, 3)
    assert decode_video(write_mp4(clip(8)), frames=4, max_side=8).shape == (4, 8, 8, 3)
    levels = out.reshape(4, -1).mean(axis=1)
    np.testing.assert_allclose(levels, [20, 60, 100, 140], atol=4)


def test_decode_webm():
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=4)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for frame in clip(3):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    out = decode_video(buffer.getvalue(), frames=3)
    np.testing.assert_allclose(out.reshape(3, -1).mean(axis=1), [0, 20, 40], atol=4)


def empty_mp4() -> bytes:
    """A valid mp4 container whose video stream has no frames."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "bad_video"), (b"\x00junk" * 50, "bad_video"), (write_mp4(clip(4))[:300], "bad_video")],
    ids=["empty-bytes", "junk", "cut"],
)
def test_undecodable_video(data, reason):
    with pytest.raises(BadSample) as info:
        decode_video(data, frames=2)
    assert info.value.reason == reason


def test_video_without_frames():
    with pytest.raises(BadSample) as info:
        decode_video(empty_mp4(), frames=2)
    assert info.value.reason == "empty_video"


def turns(text: str) -> list[dict]:
    return [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]


def members(record, **media) -> dict:
    out = {"json": json.dumps(record).encode() if record is not None else None}
    out.update({k.replace("_", "."): v for k, v in media.items()})
    return out


PNG = encoded(Image.new("RGB", (8, 8), (0, 0, 250)), "PNG")


@pytest.mark.parametrize(
    "sample, reason",
    [
        (members(None), "missing_json"),
        ({"json": b"{oops"}, "bad_json"),
        ({"json": b"[1, 2]"}, "bad_json"),
        (members({"id": "x"}), "bad_json"),
        (members({"conversations": turns("no marker")}, img0_png=PNG), "marker_mismatch"),
        (members({"conversations": turns("<image><image>")}, img0_png=PNG), "marker_mismatch"),
        (members({"conversations": turns("<video>")}, img0_png=PNG), "marker_mismatch"),
        (members({"conversations": turns("<image>")}, img0_png=b"junk"), "bad_image"),
    ],
    ids=[
        "missing",
        "not-json",
        "not-object",
        "no-turns",
        "no-marker",
        "two-markers",
        "video-marker",
        "bad-image",
    ],
)
def test_bad_samples(sample, reason):
    with pytest.raises(BadSample) as info:
        decode_sample(sample, frames=2)
    assert info.value.reason == reason


def test_decode_sample_media_order():
    record = {"conversations": turns("<image> and <image>"), "target_box": [1, 2, 3, 4]}
    red = encoded(Image.new("RGB", (8, 8), (250, 0, 0)), "JPEG")
    sample = decode_sample(members(record, img1_jpg=red, img0_png=PNG), frames=2)
    assert sample.record == record
    assert [int(np.argmax(im[0, 0])) for im in sample.images] == [2, 0]  # img0 blue, img1 red


def test_to_messages_and_dummy_image():
    conv = [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "red"},
    ]
    assert to_messages(conv) == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    with pytest.raises(ValueError, match="speaker"):
        to_messages([{"from": "robot", "value": "x"}])
    messages = add_dummy_image(to_messages(turns("hi")))
    assert messages[0]["content"][0] == {"type": "image"}
    only_assistant = add_dummy_image([{"role": "assistant", "content": "x"}])
    assert only_assistant[0] == {"role": "user", "content": [{"type": "image"}]}


def test_decode_batch_keeps_good_rows_and_reports_bad(caplog):
    import pyarrow as pa

    good = members({"conversations": turns("<image>")}, img0_png=PNG)
    rows = [
        {
            "key": "a",
            "url": "s.tar",
            "error": "",
            "names": list(good),
            "blobs": list(good.values()),
        },
        {"key": "b", "url": "s.tar", "error": "", "names": ["json"], "blobs": [b"{"]},
        {"key": "", "url": "s.tar", "error": "ReadError: unexpected end", "names": [], "blobs": []},
    ]
    with caplog.at_level("WARNING", logger="pipelines.data"):
        out = decode_batch(pa.Table.from_pylist(rows, schema=RAW_SCHEMA), frames=2, counter=None)
    assert out.column("key").to_pylist() == ["a"]
    assert "bad_json s.tar key=b" in caplog.text and "bad_tar s.tar" in caplog.text
    images, videos = decoded_media(out.to_pylist()[0])
    assert len(images) == 1 and images[0].shape == (8, 8, 3) and videos == []


def test_fit_length_policy():
    def sample(parts):
        n = sum(p if isinstance(p, int) else p.h * p.w for p in parts)
        return EncodedSample(input_ids=np.arange(n), labels=np.arange(n), vision={}, parts=parts)

    cfg = DataConfig(max_length=20, length_policy="truncate")
    kept = fit_length(sample([3, ops.Image(3, 3), 12]), cfg)
    assert len(kept) == 20 and kept.truncated
    assert kept.parts == [3, ops.Image(3, 3), 8]
    assert not fit_length(sample([5]), cfg).truncated
    with pytest.raises(BadSample, match="too_long"):
        # the cut would fall inside the image
        fit_length(sample([3, ops.Image(3, 3), 8, ops.Image(3, 3)]), cfg)
    with pytest.raises(BadSample, match="too_long"):
        fit_length(
            sample([3, ops.Image(3, 3), 12]), DataConfig(max_length=20, length_policy="drop")
        )
    with pytest.raises(ValueError, match="length_policy"):
        DataConfig(length_policy="cut")
