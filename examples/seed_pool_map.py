# The seed's map example, with `multiprocessing` replaced by `shoal`.
import time
from shoal import Process,Pool


def func(i):
    num = 0
    for j in range(5):
        num += i


if __name__ == '__main__':
    pool = Pool(4)  #
    p_list = []
    start_time = time.time()
    for i in range(100):
        p = Process(target=func,args=(i,))
        p_list.append(p)
        p.start()
    [pp.join() for pp in p_list]
    end_time = time.time()
    print(end_time - start_time)

    s_time = time.time()
    pool.map(func,range(100))  #map
    e_time = time.time()
    print(e_time - s_time)
