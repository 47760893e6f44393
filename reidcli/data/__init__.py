"""Datasets: public layouts, the synthetic generator, the dataset HDF5 store, PK batches, augmentation."""
