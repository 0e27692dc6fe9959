"""Store rows -> images -> encode -> Arrow batches -> store: ``featurelt extract`` (public API; one concern a module).

One run embeds the samples of a store with one frozen encoder (see ``featurelt.encoders``) and
writes one embedding set per encoder *product* (table ``emb_<name>``, schema
``schemas/embeddings.json``) plus one provenance row per product in ``embedding_sets``.

Modules: ``pipeline`` (:func:`extract`: checks, encoder, fit, plan, engine, provenance rows of the
run), ``plan`` (what to embed: the todo rows, incremental and resumable), ``views`` (view 0 and
RandAugment views: the loader's ``make_image``), ``batches`` (the todo rows through
:class:`featurelt.images.loader.StoreImageLoader` as encoder batches), ``encode`` (launch, one batch
in flight, read back), ``rows`` (Arrow rows written), ``local`` (local engine: chunked commits),
``ray_engine`` (Ray tasks writing fragments, one commit), ``fit`` (SAM ``pca_map`` fitted on the
train split), ``provenance`` (``embedding_sets`` rows), ``text`` (class-name text embeddings),
``device`` (device, default workers, progress bar).

Local engine (:func:`extract`)::

    samples (sample_id, split) --scan--> todo positions (split filter, --limit, minus rows already
    embedded with the same fingerprint) --> StoreImageLoader (DataLoader workers take rows by
    position and decode to uint8: plain PNG / JPEG straight to a tensor by torchvision, other files
    and augmented views through PIL; with ``resize_on="host"`` PIL also resizes and crops; images
    over twice the input size are resized in the worker) --> one channels-last batch, or one packed
    buffer when the sizes differ --> (pinned on CUDA) to the device, resized there (DeviceResize)
    unless the workers did, normalised (DeviceStage) --> encoder.encode under
    torch.inference_mode() (bf16/fp16 autocast on CUDA; one batch in flight, so the GPU encodes
    batch i+1 while the host reads back batch i) --> Arrow batches --> one store
    transaction per chunk: ``chunk_rows`` samples, or fewer once ``commit_seconds`` have passed since
    the last commit (bounded loss on a kill, and few commits when the encoder is fast), written in a
    background thread while the next chunk is encoded

Each chunk is its own store transaction, so Ctrl-C or ``kill -9`` keeps every committed chunk and
leaves the store valid; re-running the same command reads ``sample_id, view`` of the rows that
carry the run's fingerprint and embeds only what is missing (no duplicates). New samples ingested
later are embedded by re-running. The provenance rows go into the first chunk's transaction and
later chunks update their row counts, so a killed run leaves the provenance of what it committed.

Ray engine (:func:`extract` with ``engine="ray"``): the same todo list is cut into shards; Ray tasks
decode, encode and write Lance fragments into the embedding tables' directories; the driver makes
ONE store commit with :meth:`featurelt.store.Transaction.append_fragments`.

Augmented views (METHODS.md section 5, ECVL): with ``views=N`` each sample gets view 0 (the plain
image, ``aug_strength`` 0) and views ``v = 1..N`` with strength ``s_v = v / N`` (evenly spread over
(0, 1], so a head can pick the view whose strength matches a sample's momentum score ``M_i``).
A view is ``torchvision.transforms.RandAugment(num_ops=2, magnitude=round(s_v * 30),
num_magnitude_bins=31)`` applied to the decoded image before the encoder's preprocessing, with the
random ops seeded by ``(seed, sample_id, view)`` so that a view is reproducible across runs and engines.

SAM ``pca_map`` (METHODS.md section 2): a product whose encoder says ``requires_fit(product)`` is
fitted on the train split (preprocessed batches) before embedding; the fitted state is part of the
encoder's provenance and fingerprint.
"""
from __future__ import annotations

from featurelt.extract.device import default_num_workers, resolve_device
from featurelt.extract.encode import EncodedBatch, LoopTimes, encode_batch, launch_batch
from featurelt.extract.pipeline import ExtractResult, extract
from featurelt.extract.rows import embedding_batch
from featurelt.extract.text import TextExtractResult, extract_text, read_templates
from featurelt.extract.views import AUGMENTS, randaugment_magnitude, view_strength

__all__ = ["extract", "extract_text", "ExtractResult", "TextExtractResult", "resolve_device", "default_num_workers",
           "view_strength", "randaugment_magnitude", "read_templates", "encode_batch", "launch_batch", "EncodedBatch",
           "embedding_batch", "AUGMENTS", "LoopTimes"]
