"""MambaLRP for Captum (front end on zennit_mamba)."""
