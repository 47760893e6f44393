"""ReID losses: identity CE, batch-hard triplet, patch triplet and the seed's relative-position triplet."""
