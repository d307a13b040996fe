"""The three-act demo of veil (``veil demo``): secure XGBoost, split fine-tuning, confidential serving."""
