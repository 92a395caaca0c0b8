"""Spanish Dolly KD: the fine-tuned Qwen2.5-3B teacher -> Qwen2.5-0.5B-Instruct.

dolly_en_kd.py (MiniLLM's KD recipe, forward KL) on the Spanish split of the curated
multilingual Dolly. The teacher is the one dolly_es_sft.py fine-tunes first; compare the
report with the student fine-tuned without a teacher (dolly_es_sft.py:student):

    kdjax sft --config=configs/dolly_es_sft.py               # teacher -> runs/dolly_es_sft/sft
    kdjax distill --config=configs/dolly_es_kd.py            # lr 1e-5, or configs/dolly_es_kd.py:5e-5
    kdjax sft --config=configs/dolly_es_sft.py:student       # the SFT-without-KD baseline

Rouge-L of Spanish text: the report's Unicode variant keeps accented letters that the stock
rouge-score tokenizer drops. To skip the teacher's fine-tuning:
--config.teacher=Qwen/Qwen2.5-3B-Instruct (or a local HF directory).
"""
from kdjax.train_config import sibling

dolly_en_kd = sibling(__file__, "dolly_en_kd")


def get_config(lr: str = dolly_en_kd.DEFAULT_LR):
    c = dolly_en_kd.get_config(lr, name="dolly_es_kd")
    c.teacher = "runs/dolly_es_sft/sft"  # written by `kdjax sft --config=configs/dolly_es_sft.py`
    # Hub: argilla/databricks-dolly-15k-curated-multilingual, split "es" (the layout's default),
    # ~15k records like the English set. A local copy (the same columns: instruction, context,
    # response, category): --config.data.source=/data/dolly_es.parquet
    c.data.source = "argilla/databricks-dolly-15k-curated-multilingual"
    c.data.layout = "dolly_es"
    return c
