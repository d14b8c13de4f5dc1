"""The default odyn image: the static binary (`build`) and the image around it (`image`)."""
