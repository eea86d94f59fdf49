"""The wiki chunks' images in training: their source (generated and cached, or retrieved), filling the cache
ahead of training (``--pregenerate_images``), and ranking the retrieved ones before the DataLoader starts."""
from __future__ import annotations

from models.training.errors import InputError


def build_image_provider(args, device):
    """The wiki images' source: the generator with its cache, or (``--image_source retrieve``) a retriever
    over ``--image_index``, whose vision encoder is bound once loaded (:func:`prefetch_wiki_images`)."""
    from models.images.sources import build_image_source

    return build_image_source(args, device)


def _wiki_parts(dataset) -> list:
    from torch.utils.data import ConcatDataset

    from data.captions import WikiChunks

    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    return [d for d in parts if isinstance(d, WikiChunks)]


def pregenerate_wiki_images(accelerator, dataset, provider) -> dict:
    """Fill the image cache for every wiki chunk of ``dataset``, each process taking its share."""
    from tqdm.auto import tqdm

    from models.distributed import barrier

    for chunks in _wiki_parts(dataset):
        mine = list(range(accelerator.process_index, len(chunks), accelerator.num_processes))
        step = 8 * provider.gen_batch_size
        with tqdm(total=len(mine), unit="chunk", disable=None if accelerator.is_local_main_process else True) as bar:
            for start in range(0, len(mine), step):
                batch = mine[start:start + step]
                provider.get([[chunks.prompt(i)] for i in batch])
                bar.update(len(batch))
                bar.set_postfix(provider.stats())
    provider.flush()  # on disk before DataLoader workers (other processes) look for them
    barrier()  # a check-in: a rank that failed on its share is heard here
    return provider.stats()


def prefetch_wiki_images(accelerator, dataset, retriever, encoder) -> int:
    """Retrieved wiki images: rank every chunk's image prompt now, on the device (each process its share,
    then shared with all), so that the DataLoader workers only read image files. Returns the prompt count."""
    from accelerate.utils import gather_object

    try:
        retriever.bind(encoder)  # refuses an index built with another vision encoder
    except ValueError as err:
        raise InputError(str(err)) from None
    for chunks in _wiki_parts(dataset):
        mine = range(accelerator.process_index, len(chunks), accelerator.num_processes)
        retriever.prefetch([[chunks.prompt(i)] for i in mine])
    for rankings in gather_object([retriever.rankings]):
        retriever.rankings.update(rankings)
    return len(retriever.rankings)

