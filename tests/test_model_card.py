"""Model cards are written through `huggingface_hub.ModelCard`: the Hub reads their metadata."""
from huggingface_hub import ModelCard

from dualign.train.saving import card_text


def test_card_metadata_is_what_the_hub_reads(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(card_text("# MoCAN — trained with dualign\n\n| β | 0.1 |\n", base_model="HuggingFaceTB/x",
                              is_peft=True, tags=["dpo", "can"]))
    card = ModelCard.load(path)
    assert card.data.base_model == "HuggingFaceTB/x" and card.data.library_name == "peft"
    assert card.data.tags == ["dualign", "safety-alignment", "dpo", "can"]
    assert card.text.strip() == "# MoCAN — trained with dualign\n\n| β | 0.1 |"


def test_full_weights_without_a_base_name_the_library_only(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(card_text("body", base_model=None, is_peft=False, tags=[]))
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.base_model is None
