"""Where MoE layers get their experts: the provider interface, and (as they land) the tiered store, its
placement and eviction policies, the prefetcher and calibration."""
