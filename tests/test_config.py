

def test_every_config_field_is_documented():
    """docs/config.md names every field of RunConfig (as `name` in a table or the text)."""
    from pathlib import Path

    from pydantic import BaseModel

    from ddmkit.config import RunConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()

    def leaves(model):
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from leaves(ann)
            else:
                yield name

    missing = sorted({name for name in leaves(RunConfig) if f"`{name}`" not in doc and f"] {name}`" not in doc})
    assert not missing, f"docs/config.md does not document: {missing}"


def test_bad_compile_mode_names_the_field_and_the_accepted_values(tmp_path):
    import pytest

    from ddmkit.config import load_config
    from ddmkit.errors import DDMError

    path = tmp_path / "bad.toml"
    path.write_text('[expert.train]\ncompile_mode = "fast"\n')
    with pytest.raises(DDMError, match=r"expert\.train\.compile_mode.*'default', 'reduce-overhead' or 'max-autotune'"):
        load_config(path)
