"""``pdserve plan validate``: replay measured ``bench compare`` runs through the simulator, with
calibrated step profiles, and compare the predictions with the measurements."""
