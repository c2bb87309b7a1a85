import json
import shutil

import pytest
from PIL import Image

import data
import train


def write_hf_rows_per_caption(root, n_images=20, captions_per_image=5, id_column=None):
    """A Dataset of one row per caption, as many hub caption datasets are stored."""
    import datasets

    images, captions, ids = [], [], []
    for i in range(n_images):
        image = Image.new("RGB", (16, 16), (i * 12 % 256, 40, 200 - i * 7 % 200))
        for k in range(captions_per_image):
            images.append(image)
            captions.append(f"picture {i} caption {k}")
            ids.append(1000 + i)
    columns = {"image": images, "caption": captions}
    features = {"image": datasets.Image(), "caption": datasets.Value("string")}
    if id_column:
        columns[id_column], features[id_column] = ids, datasets.Value("int64")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("id_column", [None, "image_id"])
def test_hf_rows_of_one_image_become_one_record_with_all_its_captions(tmp_path, id_column):
    root = write_hf_rows_per_caption(tmp_path / "hf", id_column=id_column)
    splits = data.load_splits(f"hf:{root}", root, cache_dir=tmp_path / "cache")
    records = [r for split in splits.values() for r in split]
    assert len(records) == 20, "one record per image, not per caption row"
    for r in records:
        picture = {c.split(" caption")[0] for c in r.captions}
        assert len(r.captions) == 5 and len(picture) == 1, r.captions
    pictures = {split: {r.captions[0].split(" caption")[0] for r in rs} for split, rs in splits.items()}
    assert not (pictures["train"] & pictures["test"]) and not (pictures["train"] & pictures["val"])
    assert len(splits["test"]) >= 1 and len(splits["val"]) >= 1


def test_the_same_image_under_two_names_in_two_splits_is_refused(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "copy-of-a.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "c.png")
    rows = [{"image": n, "caption": f"caption of {n}"} for n in ("a.png", "copy-of-a.png", "b.png", "c.png")]
    data.write_jsonl(tmp_path / "captions.jsonl", rows)
    named = {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["copy-of-a.png"]}
    (tmp_path / "splits.json").write_text(json.dumps(named))
    with pytest.raises(data.DataError, match="are the same image") as e:
        data.load_splits("folder", tmp_path)
    assert "copy-of-a.png" in str(e.value) and "a.png (in train)" in str(e.value)


def test_a_split_file_naming_one_image_in_two_splits_is_refused(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "c.png")
    data.write_jsonl(tmp_path / "captions.jsonl", [{"image": n, "caption": "c"} for n in ("a.png", "b.png", "c.png")])
    named = {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["a.png"]}
    (tmp_path / "splits.json").write_text(json.dumps(named))
    with pytest.raises(data.DataError, match="is in both the train and the test split"):
        data.load_splits("folder", tmp_path)


def test_the_split_follows_the_data_seed_not_the_training_seed(tmp_path, vision_dir, language_dir):
    for i in range(40):
        Image.new("RGB", (8, 8), (i * 6, 100, 50)).save(tmp_path / f"{i:02d}.png")
    data.write_jsonl(tmp_path / "captions.jsonl", [{"image": f"{i:02d}.png", "caption": "c"} for i in range(40)])

    def test_set(*options):
        args = train.parse_args(
            "explained",
            [
                "--data",
                "folder",
                "--data-dir",
                str(tmp_path),
                "--vision",
                str(vision_dir),
                "--language",
                str(language_dir),
                *options,
            ],
        )
        return data.split_id(data.splits_for(train.run_config("explained", args))["test"])

    assert test_set("--seed", "0") == test_set("--seed", "1") == test_set("--seed", "7")
    assert test_set("--data-seed", "1") != test_set("--data-seed", "0")
