"""From a checkpoint to images: the pipeline loader, sampler and sweep settings, the image iterator, sample folders."""
