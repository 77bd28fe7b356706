"""Data for CHIAR-Former: tokenizers, datasets, LM batching and the task registry.

Start here:

    from chiarformer.data import load_task, TASKS, task_options, LISTOPS_CPU
    task = load_task("wikitext2-proxy", seq_len=256)        # see chiarformer.data.tasks
    task.kind, task.train, task.val, task.test, task.tokenizer, task.protocol

    from chiarformer.data import LMWindows
    val = LMWindows(task.val, task.seq_len, task.protocol["stride"])   # the engine's windows (lm.py)
    b = val.batch([0, 1])                                   # input_ids, labels (-100: context only)

    task = load_task("listops", **LISTOPS_CPU)              # classification
    b = task.train.batch(indices)                           # input_ids, attention_mask, labels

Tasks: wikitext2, wikitext103, wikitext2-proxy, imdb-lm-proxy, text, imdb, lra-text, listops,
listops-flat (TASKS holds one TaskSpec for each; register_task adds one). Building blocks: gpt2_tokenizer / ByteTokenizer
(tokenizer.py), WikiText sources (wikitext.py), IMDB (imdb.py), ListOps generation and TSV
files (listops.py), users' text files (text.py), the verified disk cache (cache.py).
Data folder: CHIAR_DATA_DIR or ~/.cache/chiarformer/data (`chiar download` fills it, download.py);
cache: CHIAR_CACHE_DIR or ~/.cache/chiarformer.
Every user mistake raises chiarformer.errors.UserError with a one-line message.
"""

from .cache import Cache
from .classification import ClassificationData, stratified_split
from .imdb import load_imdb
from .listops import (
    ListOpsTokenizer,
    generate_listops,
    generate_listops_flat,
    read_listops_tsv,
    write_listops_tsv,
)
from .lm import LMWindows, window_spans
from .tasks import LISTOPS_CPU, TASKS, Task, TaskSpec, load_task, register_task, task_options, task_tokenizer
from .tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer, gpt2_tokenizer
from .wikitext import wikitext_source, wikitext_tokens

__all__ = [
    "ByteTokenizer",
    "Cache",
    "ClassificationData",
    "GPT2Tokenizer",
    "LISTOPS_CPU",
    "LMWindows",
    "ListOpsTokenizer",
    "TASKS",
    "Task",
    "TaskSpec",
    "generate_listops",
    "generate_listops_flat",
    "get_tokenizer",
    "gpt2_tokenizer",
    "load_imdb",
    "load_task",
    "read_listops_tsv",
    "register_task",
    "stratified_split",
    "task_options",
    "task_tokenizer",
    "window_spans",
    "wikitext_source",
    "wikitext_tokens",
    "write_listops_tsv",
]
