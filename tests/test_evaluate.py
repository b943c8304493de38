"""omnivae.evaluate: which images a run is scored on."""
import numpy as np

from fixtures import synthetic_omniglot
from omnivae.evaluate import whole_alphabets


def test_subset_takes_whole_alphabets_until_enough_images():
    data = synthetic_omniglot(characters=12, drawers=20, alphabets=4)  # 4 alphabets x 3 characters x 20 drawers
    for wanted, alphabets in ((1, 1), (60, 1), (61, 2), (150, 3), (240, 4)):
        picked = whole_alphabets(data, wanted, seed=3)
        assert len(np.unique(picked.alphabet)) == alphabets and len(picked) == 60 * alphabets
        for a in np.unique(picked.alphabet):  # every drawing of a picked alphabet, so episodes keep their drawers
            assert np.sum(picked.alphabet == a) == np.sum(data.alphabet == a)
    assert whole_alphabets(data, 1, seed=3).alphabet[0] == whole_alphabets(data, 1, seed=3).alphabet[0]
    firsts = {int(whole_alphabets(data, 1, seed=s).alphabet[0]) for s in range(20)}
    assert len(firsts) > 1  # the seed decides which alphabets
