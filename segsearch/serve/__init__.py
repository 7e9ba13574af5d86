"""The serving half: a trained model as a `MaskPredictor`, logged to MLflow, promoted in the
registry, used to predict masks and evaluated at the images' own resolution."""
