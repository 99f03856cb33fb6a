# Declarations of the Linux C interfaces that ext/pump.pyx drives, mirroring the
# system headers one block per header (httptools style: the .pxd only mirrors C;
# all logic lives in the .pyx). Every function here is safe to call without the
# GIL: none of them touch Python objects.
#
# The structs are declared through the real headers, so the compiler sees the
# true layout (``struct epoll_event`` is __attribute__((packed)) on x86-64).

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/signalfd.h>" nogil:
    ctypedef struct sigset_t:
        pass

    enum:
        SFD_CLOEXEC
        SFD_NONBLOCK

    int sigemptyset(sigset_t *set)
    int sigaddset(sigset_t *set, int signum)
    int signalfd(int fd, const sigset_t *mask, int flags)


cdef extern from "<fcntl.h>" nogil:
    # splice(2), pipe2(2) and F_{SET,GET}PIPE_SZ need _GNU_SOURCE, which
    # pyconfig.h (included first, through Python.h) already defines.
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        F_GETFL
        F_SETFL
        O_NONBLOCK
        O_CLOEXEC

    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out,
                   size_t length, unsigned int flags)
    int fcntl(int fd, int cmd, ...)


cdef extern from "<unistd.h>" nogil:
    int pipe2(int *pipefd, int flags)
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    struct linger:
        int l_onoff
        int l_linger

    enum:
        SOL_SOCKET
        SO_LINGER
        SO_ERROR
        SO_TYPE
        SO_OOBINLINE
        SOCK_STREAM
        MSG_NOSIGNAL
        MSG_DONTWAIT
        MSG_PEEK
        SHUT_WR

    ssize_t recv(int fd, void *buf, size_t length, int flags)
    ssize_t send(int fd, const void *buf, size_t length, int flags)
    int shutdown(int fd, int how)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    # POSIX: 1 when the next byte to read is the urgent mark, 0 if not, -1 on
    # error (glibc: ioctl(fd, SIOCATMARK)).
    int sockatmark(int fd)


cdef extern from "<time.h>" nogil:
    ctypedef long time_t

    struct timespec:
        time_t tv_sec
        long tv_nsec

    enum:
        CLOCK_MONOTONIC

    int clock_gettime(int clk_id, timespec *tp)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass

    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


cdef extern from * nogil:
    """
    #include <signal.h>
    #include <sys/epoll.h>
    #include <sys/socket.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    /* recv(), send() and epoll_wait() as the system calls alone. libc's are
       cancellation points: in a process with threads (every Python one)
       each call switches asynchronous cancellation on and off around the
       system call, ~60 instructions a call, four or five calls a request.
       No thread here is ever cancelled (pthread_cancel), so nothing is
       lost; errno is set as libc's would set it (syscall()). */
    static inline ssize_t l4_recv_nc(int fd, void *buf, size_t n, int flags) {
        return (ssize_t)syscall(SYS_recvfrom, fd, buf, n, flags, NULL, NULL);
    }
    static inline ssize_t l4_send_nc(int fd, const void *buf, size_t n, int flags) {
        return (ssize_t)syscall(SYS_sendto, fd, buf, n, flags, NULL, 0);
    }
    static inline int l4_epoll_wait_nc(int epfd, struct epoll_event *ev, int max, int timeout) {
        /* epoll_pwait with no mask is epoll_wait (and the only one some
           architectures have) */
        return (int)syscall(SYS_epoll_pwait, epfd, ev, max, timeout, NULL, (size_t)(_NSIG / 8));
    }
    """
    # (see the comment above: the hot paths of the compiled loops)
    ssize_t recv_nc "l4_recv_nc"(int fd, void *buf, size_t length, int flags)
    ssize_t send_nc "l4_send_nc"(int fd, const void *buf, size_t length, int flags)
    int epoll_wait_nc "l4_epoll_wait_nc"(int epfd, epoll_event *events, int maxevents, int timeout)
