# The ImageNet training example of pytorch/examples (imagenet/main.py, BSD 3-Clause
# License, Copyright (c) 2017 PyTorch contributors) with DSQ quantization-aware
# training. Arguments, defaults and functions are the example's; what was added is
# fenced by "# --- dsq_ext" comments, and the helpers it needs are at the end.
# Usage, flags, TensorBoard tags and the checkpoint format: docs/training.md.
# The example's own lines keep their formatting, so that the diff shows only the additions:
# fmt: off
# ruff: noqa: B028, E501, UP004, UP031, UP032
import argparse
import math
import os
import random
import time
import warnings
from enum import Enum

import torch
import torch.backends.cudnn as cudnn
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.parallel
import torch.optim
import torch.utils.data
import torch.utils.data.distributed
import torchvision.datasets as datasets
import torchvision.models as models
import torchvision.transforms as transforms
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import Subset

import dsq_ext  # --- dsq_ext
import dsq_ext.checkpoint  # --- dsq_ext
import dsq_ext.datasets  # --- dsq_ext
import dsq_ext.monitor  # --- dsq_ext

model_names = sorted(name for name in models.__dict__
    if name.islower() and not name.startswith("__")
    and callable(models.__dict__[name]))

parser = argparse.ArgumentParser(description='PyTorch ImageNet Training')
parser.add_argument('data', metavar='DIR', nargs='?', default='imagenet',
                    help='path to dataset (default: imagenet)')
parser.add_argument('-a', '--arch', metavar='ARCH', default='resnet18',
                    choices=model_names,
                    help='model architecture: ' +
                        ' | '.join(model_names) +
                        ' (default: resnet18)')
parser.add_argument('-j', '--workers', default=4, type=int, metavar='N',
                    help='number of data loading workers (default: 4)')
parser.add_argument('--epochs', default=90, type=int, metavar='N',
                    help='number of total epochs to run')
parser.add_argument('--start-epoch', default=0, type=int, metavar='N',
                    help='manual epoch number (useful on restarts)')
parser.add_argument('-b', '--batch-size', default=256, type=int,
                    metavar='N',
                    help='mini-batch size (default: 256), this is the total '
                         'batch size of all GPUs on the current node when '
                         'using Data Parallel or Distributed Data Parallel')
parser.add_argument('--lr', '--learning-rate', default=0.1, type=float,
                    metavar='LR', help='initial learning rate', dest='lr')
parser.add_argument('--momentum', default=0.9, type=float, metavar='M',
                    help='momentum')
parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float,
                    metavar='W', help='weight decay (default: 1e-4)',
                    dest='weight_decay')
parser.add_argument('-p', '--print-freq', default=10, type=int,
                    metavar='N', help='print frequency (default: 10)')
parser.add_argument('--resume', default='', type=str, metavar='PATH',
                    help='path to latest checkpoint (default: none)')
parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                    help='evaluate model on validation set')
parser.add_argument('--pretrained', dest='pretrained', action='store_true',
                    help='use pre-trained model')
parser.add_argument('--world-size', default=-1, type=int,
                    help='number of nodes for distributed training')
parser.add_argument('--rank', default=-1, type=int,
                    help='node rank for distributed training')
parser.add_argument('--dist-url', default='tcp://224.66.41.62:23456', type=str,
                    help='url used to set up distributed training')
parser.add_argument('--dist-backend', default='nccl', type=str,
                    help='distributed backend (nccl on GPUs; gloo is used on CPU)')
parser.add_argument('--seed', default=None, type=int,
                    help='seed for initializing training. ')
parser.add_argument('--gpu', default=None, type=int,
                    help='GPU id to use.')
parser.add_argument('--no-accel', action='store_true',
                    help='disables accelerator')
parser.add_argument('--multiprocessing-distributed', action='store_true',
                    help='Use multi-processing distributed training to launch '
                         'N processes per node, which has N GPUs. This is the '
                         'fastest way to use PyTorch for either single node or '
                         'multi node data parallel training')
parser.add_argument('--dummy', action='store_true', help="use fake data to benchmark")


# --- dsq_ext
def _quant_method(text):
    method = text.lower()
    if method not in ('dsq', 'uniform'):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from DSQ, uniform; any case)")
    return method


def _checked(kind, ok, message):
    """An argparse type: kind(text), rejected with message unless ok(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"{message}, got {text!r}")
        return value
    return parse


_positive = _checked(int, lambda n: n >= 1, "expected a positive integer")


def _config_field(field, kind):
    """An argparse type for one QuantConfig field, checked by QuantConfig itself: the ranges
    live there alone, and its message names the field and the value (argparse adds the flag)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = text  # QuantConfig rejects it with its own message
        try:
            dsq_ext.QuantConfig(**{field: value})
        except (TypeError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


_bits = _config_field("bits", int)
_alpha = _config_field("alpha_init", float)
_percentile = _config_field("percentile", float)
_alpha_lr_scale = _config_field("alpha_lr_scale", float)
_bounds_lr_scale = _config_field("bounds_lr_scale", float)


# Processes per node on CPU, where there is no GPU count to take it from.
parser.add_argument('--nproc-per-node', default=None, type=_positive, metavar='N',
                    help='processes per node for --multiprocessing-distributed '
                         '(default: one per GPU; 1 on CPU)')

quant = parser.add_argument_group(
    'quantization', 'DSQ (Gong et al., ICCV 2019) or uniform quantization-aware training. '
    'Without -q the float model trains: that is the float baseline.')
quant.add_argument('-q', '--quantize', default=None, type=_quant_method, metavar='{DSQ,uniform}',
                   help='quantize conv and linear layers with DSQ or with uniform '
                        'quantization and a straight-through gradient (case-insensitive)')
quant.add_argument('--quan_bit', '--quan-bit', default=None, type=_bits, metavar='N',
                   help='bits of weights and, with --quantize_input, activations (default: 8)')
quant.add_argument('--quantize_input', '--quantize-input', action='store_true',
                   help='quantize activations (the inputs of quantized layers) as well as weights')
quant.add_argument('--w-bits', default=None, type=_bits, metavar='N',
                   help='weight bits (default: --quan_bit)')
quant.add_argument('--a-bits', default=None, type=_bits, metavar='N',
                   help='activation bits (default: --quan_bit); implies --quantize_input')
quant.add_argument('--per-channel', action='store_true',
                   help='weight bounds per output channel instead of per tensor')
quant.add_argument('--quantize-first-last', action='store_true',
                   help='quantize the first conv and the classifier too (the paper keeps them float)')
quant.add_argument('--bounds', default=None, choices=('learned', 'ema'),
                   help='clipping bounds learned by backprop, or a moving average of '
                        'the min/max seen in training (default: learned)')
quant.add_argument('--alpha-init', default=None, type=_alpha, metavar='A',
                   help=f"DSQ's initial alpha, in (0, 0.5] (default: {dsq_ext.QuantConfig().alpha_init:g})")
quant.add_argument('--act-percentile', default=None, type=_percentile, metavar='P',
                   help='set the activation bounds from the (100-P)-th and P-th percentiles of the '
                        'batch instead of its min and max (default: min/max)')
quant.add_argument('--alpha-lr-scale', default=None, type=_alpha_lr_scale, metavar='K',
                   help="DSQ's alpha learns at K times --lr (0 keeps it at --alpha-init; "
                        f"default: {dsq_ext.QuantConfig().alpha_lr_scale:g})")
quant.add_argument('--bounds-lr-scale', default=None, type=_bounds_lr_scale, metavar='K',
                   help='learned bounds learn at K times --lr (0 keeps them at their first-batch '
                        f'values; default: {dsq_ext.QuantConfig().bounds_lr_scale:g})')
quant.add_argument('--grid', default=None, choices=('free', 'affine', 'symmetric'),
                   help='quantization levels: free (lower + k*Delta, the paper\'s), affine (0.0 is a '
                        'level, integer zero point, as ONNX QuantizeLinear stores it) or symmetric '
                        '(weights; zero point 0, levels -(2^(b-1)-1)..2^(b-1)-1; activations then '
                        f'use affine) (default: {dsq_ext.QuantConfig().grid})')
quant.add_argument('--recompute', default=None, action=argparse.BooleanOptionalAction,
                   help='quantized layers keep only their float input and weight for backward and '
                        'quantize them again there: the float model\'s memory, the same gradients '
                        '(default); --no-recompute keeps the quantized copies')
quant.add_argument('--image-size', default=224, type=_positive, metavar='N',
                   help='training crop; validation resizes to N/0.875 and centre-crops N (default: 224)')
quant.add_argument('--init-from', default='', type=str, metavar='CKPT',
                   help='start from the weights of a float checkpoint written by this script '
                        "(the paper's fine-tuning workflow)")
quant.add_argument('--log_path', '--log-path', default='log', type=str, metavar='DIR',
                   help='TensorBoard events and checkpoints (default: log)')
# --- end dsq_ext

best_acc1 = 0


def main():
    args = parser.parse_args()
    check_args(args)  # --- dsq_ext: argument combinations, resume and init-from files

    if args.seed is not None:
        random.seed(args.seed)
        torch.manual_seed(args.seed)
        cudnn.deterministic = True
        cudnn.benchmark = False
        warnings.warn('You have chosen to seed training. '
                      'This will turn on the CUDNN deterministic setting, '
                      'which can slow down your training considerably! '
                      'You may see unexpected behavior when restarting '
                      'from checkpoints.')

    if args.gpu is not None:
        warnings.warn('You have chosen a specific GPU. This will completely '
                      'disable data parallelism.')

    if args.dist_url == "env://" and args.world_size == -1:
        args.world_size = int(os.environ["WORLD_SIZE"])

    args.distributed = args.world_size > 1 or args.multiprocessing_distributed

    use_accel = not args.no_accel and torch.accelerator.is_available()

    if use_accel:
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")

    print(f"Using device: {device}")

    if device.type =='cuda':
        ngpus_per_node = torch.accelerator.device_count()
        if ngpus_per_node == 1 and args.dist_backend == "nccl":
            warnings.warn("nccl backend >=2.5 requires GPU count>1, see https://github.com/NVIDIA/nccl/issues/103 perhaps use 'gloo'")
    else:
        ngpus_per_node = 1

    # --- dsq_ext (distributed on CPU)
    if args.nproc_per_node is not None:
        ngpus_per_node = args.nproc_per_node
    if args.distributed and device.type == 'cpu' and args.dist_backend == 'nccl':
        print("=> no GPU: using the gloo backend instead of nccl")
        args.dist_backend = 'gloo'
    # --- end dsq_ext

    if args.multiprocessing_distributed:
        # Since we have ngpus_per_node processes per node, the total world_size
        # needs to be adjusted accordingly
        args.world_size = ngpus_per_node * args.world_size
        # Use torch.multiprocessing.spawn to launch distributed processes: the
        # main_worker process function
        mp.spawn(main_worker, nprocs=ngpus_per_node, args=(ngpus_per_node, args))
    else:
        # Simply call main_worker function
        main_worker(args.gpu, ngpus_per_node, args)


def main_worker(gpu, ngpus_per_node, args):
    global best_acc1
    args.gpu = gpu

    use_accel = not args.no_accel and torch.accelerator.is_available()

    # --- dsq_ext: torchrun gives each process its GPU in LOCAL_RANK
    if use_accel and args.gpu is None and args.dist_url == "env://" and "LOCAL_RANK" in os.environ:
        args.gpu = int(os.environ["LOCAL_RANK"])
    # --- end dsq_ext

    if use_accel:
        if args.gpu is not None:
            torch.accelerator.set_device_index(args.gpu)
        device = torch.accelerator.current_accelerator()
    else:
        device = torch.device("cpu")

    if args.distributed:
        if args.dist_url == "env://" and args.rank == -1:
            args.rank = int(os.environ["RANK"])
        if args.multiprocessing_distributed:
            # For multiprocessing distributed training, rank needs to be the
            # global rank among all the processes
            args.rank = args.rank * ngpus_per_node + gpu
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url,
                                world_size=args.world_size, rank=args.rank)
    # create model
    if args.pretrained:
        print("=> using pre-trained model '{}'".format(args.arch))
        # --- dsq_ext: check_args made sure the weights are in the hub cache (no download)
        model = models.__dict__[args.arch](weights='DEFAULT')
    else:
        print("=> creating model '{}'".format(args.arch))
        model = models.__dict__[args.arch]()

    # --- dsq_ext: the one conversion, after the model is built and before it is placed
    if args.init_from:
        load_float_weights(model, args.init_from)
    if args.quantize:
        # recompute changes how the layers compute, never a number: not part of the config.
        cfg = quant_config(args)
        model = cfg.quantize(model, recompute=args.recompute)
        flags = describe_config(cfg) + " --no-recompute" * (not args.recompute)
        print(f"=> quantized {len(dsq_ext.quantized_modules(model))} layers: {flags}")
    # --- end dsq_ext

    if not use_accel:
        print('using CPU, this will be slow')
        # --- dsq_ext: the example leaves CPU processes unsynchronised; DDP over gloo averages them
        if args.distributed:
            procs = local_procs(args, ngpus_per_node)
            torch.set_num_threads(max(1, torch.get_num_threads() // procs))
            args.batch_size = int(args.batch_size / procs)
            args.workers = int((args.workers + procs - 1) / procs)
            model = torch.nn.parallel.DistributedDataParallel(model)
        # --- end dsq_ext
    elif args.distributed:
        # For multiprocessing distributed, DistributedDataParallel constructor
        # should always set the single device scope, otherwise,
        # DistributedDataParallel will use all available devices.
        if device.type == 'cuda':
            if args.gpu is not None:
                torch.cuda.set_device(args.gpu)
                model.cuda(device)
                # When using a single GPU per process and per
                # DistributedDataParallel, we need to divide the batch size
                # ourselves based on the total number of GPUs of the current node.
                args.batch_size = int(args.batch_size / ngpus_per_node)
                args.workers = int((args.workers + ngpus_per_node - 1) / ngpus_per_node)
                model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu])
            else:
                model.cuda()
                # DistributedDataParallel will divide and allocate batch_size to all
                # available GPUs if device_ids are not set
                model = torch.nn.parallel.DistributedDataParallel(model)
    # --- dsq_ext: DataParallel replicas would set quantizer bounds on throw-away copies
    elif device.type == 'cuda' and args.quantize:
        if args.gpu is None and torch.accelerator.device_count() > 1:
            print("=> a quantized model trains on one GPU without DDP; "
                  "use --multiprocessing-distributed for several")
        model.cuda()
    # --- end dsq_ext
    elif device.type == 'cuda':
        # DataParallel will divide and allocate batch_size to all available GPUs
        if args.arch.startswith('alexnet') or args.arch.startswith('vgg'):
            model.features = torch.nn.DataParallel(model.features)
            model.cuda()
        else:
            model = torch.nn.DataParallel(model).cuda()
    else:
        model.to(device)


    # define loss function (criterion), optimizer, and learning rate scheduler
    criterion = nn.CrossEntropyLoss().to(device)

    # --- dsq_ext: no weight decay on the quantizers' lower, upper and alpha
    # and the learning-rate scales of alpha and the bounds (--alpha-lr-scale, --bounds-lr-scale)
    optimizer = torch.optim.SGD(dsq_ext.param_groups(model, args.weight_decay, args.lr), args.lr,
                                momentum=args.momentum,
                                weight_decay=args.weight_decay)

    """Sets the learning rate to the initial LR decayed by 10 every 30 epochs"""
    scheduler = StepLR(optimizer, step_size=30, gamma=0.1)

    # optionally resume from a checkpoint
    if args.resume:
        if os.path.isfile(args.resume):
            print("=> loading checkpoint '{}'".format(args.resume))
            # --- dsq_ext: loaded on the CPU, so that a GPU checkpoint resumes anywhere;
            # load_state_dict copies to the model's device. check_args compared its config.
            checkpoint = read_checkpoint(args.resume, '--resume')
            args.start_epoch = checkpoint['epoch']
            best_acc1 = checkpoint['best_acc1']
            dsq_ext.checkpoint.load_model_state(model, checkpoint['state_dict'])
            # --- end dsq_ext
            optimizer.load_state_dict(checkpoint['optimizer'])
            scheduler.load_state_dict(checkpoint['scheduler'])
            print("=> loaded checkpoint '{}' (epoch {})"
                  .format(args.resume, checkpoint['epoch']))
        else:
            print("=> no checkpoint found at '{}'".format(args.resume))


    # Data loading code
    size = args.image_size  # --- dsq_ext: --image-size replaces the example's 224
    if args.dummy:
        print("=> Dummy data is used!")
        train_dataset = datasets.FakeData(1281167, (3, size, size), 1000, transforms.ToTensor())
        val_dataset = datasets.FakeData(50000, (3, size, size), 1000, transforms.ToTensor())
    else:
        traindir = os.path.join(args.data, 'train')
        valdir = os.path.join(args.data, 'val')
        # --- dsq_ext: the example's transforms at --image-size (one definition, shared
        # with experiments/); ImageFolder's loader converts every image to RGB, so
        # grayscale data needs no change.
        train_dataset = datasets.ImageFolder(traindir, dsq_ext.datasets.train_transform(size))
        val_dataset = datasets.ImageFolder(valdir, dsq_ext.datasets.val_transform(size))
        # an unreadable (e.g. truncated) image names its file
        name_unreadable_images(train_dataset)
        name_unreadable_images(val_dataset)
        # --- end dsq_ext

    if args.distributed:
        train_sampler = torch.utils.data.distributed.DistributedSampler(train_dataset)
        val_sampler = torch.utils.data.distributed.DistributedSampler(val_dataset, shuffle=False, drop_last=True)
    else:
        train_sampler = None
        val_sampler = None

    train_loader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.batch_size, shuffle=(train_sampler is None),
        num_workers=args.workers, pin_memory=True, sampler=train_sampler)

    val_loader = torch.utils.data.DataLoader(
        val_dataset, batch_size=args.batch_size, shuffle=False,
        num_workers=args.workers, pin_memory=True, sampler=val_sampler)

    if args.evaluate:
        validate(val_loader, model, criterion, args)
        return

    # --- dsq_ext: one writer of events and checkpoints
    is_writer = not args.distributed or args.rank == 0
    writer = make_writer(args.log_path) if is_writer else None
    # --- end dsq_ext

    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            train_sampler.set_epoch(epoch)

        # train for one epoch
        train_stats = train(train_loader, model, criterion, optimizer, epoch, device, args)  # --- dsq_ext: averages

        # evaluate on validation set
        acc1, val_stats = validate(val_loader, model, criterion, args)  # --- dsq_ext: and the loss

        lr = optimizer.param_groups[0]['lr']  # --- dsq_ext: the lr this epoch used
        scheduler.step()

        # remember best acc@1 and save checkpoint
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)

        # --- dsq_ext
        if args.distributed:
            print_replica_digest(model, args)
        if writer is not None:
            log_epoch(writer, epoch, model, train_stats, val_stats, lr)
        # --- end dsq_ext

        if is_writer:  # --- dsq_ext: rank 0 only; all ranks would write to one --log_path
            save_checkpoint({
                'epoch': epoch + 1,
                'arch': args.arch,
                'state_dict': dsq_ext.checkpoint.canonical_state_dict(model),  # --- dsq_ext: without DDP's "module."
                'best_acc1': best_acc1,
                'optimizer' : optimizer.state_dict(),
                'scheduler' : scheduler.state_dict(),
                'quant': quant_config(args).to_dict(),  # --- dsq_ext
                'image_size': args.image_size,  # --- dsq_ext
            }, is_best, os.path.join(args.log_path, 'checkpoint.pth.tar'))  # --- dsq_ext: --log_path

    # --- dsq_ext
    if writer is not None:
        writer.close()
        print(f"=> best Acc@1 {best_acc1:.3f}; checkpoints and TensorBoard events in {args.log_path}")
    # --- end dsq_ext

def train(train_loader, model, criterion, optimizer, epoch, device, args):

    use_accel = not args.no_accel and torch.accelerator.is_available()

    batch_time = AverageMeter('Time', use_accel, ':6.3f', Summary.NONE)
    data_time = AverageMeter('Data', use_accel, ':6.3f', Summary.NONE)
    losses = AverageMeter('Loss', use_accel, ':.4e', Summary.NONE)
    top1 = AverageMeter('Acc@1', use_accel, ':6.2f', Summary.NONE)
    top5 = AverageMeter('Acc@5', use_accel, ':6.2f', Summary.NONE)
    progress = ProgressMeter(
        len(train_loader),
        [batch_time, data_time, losses, top1, top5],
        prefix="Epoch: [{}]".format(epoch))

    # switch to train mode
    model.train()

    end = time.time()
    for i, (images, target) in enumerate(train_loader):
        # measure data loading time
        data_time.update(time.time() - end)

        # move data to the same device as model
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)

        # compute output
        output = model(images)
        loss = criterion(output, target)

        # measure accuracy and record loss
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        losses.update(loss.item(), images.size(0))
        top1.update(acc1[0], images.size(0))
        top5.update(acc5[0], images.size(0))

        # compute gradient and do SGD step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dsq_ext.project_alpha_(model)  # --- dsq_ext: keep each alpha where it has a gradient

        # measure elapsed time
        batch_time.update(time.time() - end)
        end = time.time()

        if i % args.print_freq == 0:
            progress.display(i + 1)

    # --- dsq_ext: epoch averages over all ranks, for TensorBoard
    if args.distributed:
        for meter in (losses, top1, top5):
            meter.all_reduce()
    return {"loss": float(losses.avg), "acc1": float(top1.avg), "acc5": float(top5.avg)}
    # --- end dsq_ext


def validate(val_loader, model, criterion, args):

    use_accel = not args.no_accel and torch.accelerator.is_available()

    def run_validate(loader, base_progress=0):

        if use_accel:
            device = torch.accelerator.current_accelerator()
        else:
            device = torch.device("cpu")

        with torch.no_grad():
            end = time.time()
            for i, (images, target) in enumerate(loader):
                i = base_progress + i
                if use_accel:
                    if args.gpu is not None and device.type=='cuda':
                        torch.accelerator.set_device_index(args.gpu)
                        images = images.cuda(args.gpu, non_blocking=True)
                        target = target.cuda(args.gpu, non_blocking=True)
                    else:
                        images = images.to(device)
                        target = target.to(device)

                # compute output
                output = model(images)
                loss = criterion(output, target)

                # measure accuracy and record loss
                acc1, acc5 = accuracy(output, target, topk=(1, 5))
                losses.update(loss.item(), images.size(0))
                top1.update(acc1[0], images.size(0))
                top5.update(acc5[0], images.size(0))

                # measure elapsed time
                batch_time.update(time.time() - end)
                end = time.time()

                if i % args.print_freq == 0:
                    progress.display(i + 1)

    batch_time = AverageMeter('Time', use_accel, ':6.3f', Summary.NONE)
    losses = AverageMeter('Loss', use_accel, ':.4e', Summary.NONE)
    top1 = AverageMeter('Acc@1', use_accel, ':6.2f', Summary.AVERAGE)
    top5 = AverageMeter('Acc@5', use_accel, ':6.2f', Summary.AVERAGE)
    progress = ProgressMeter(
        len(val_loader) + (args.distributed and (len(val_loader.sampler) * args.world_size < len(val_loader.dataset))),
        [batch_time, losses, top1, top5],
        prefix='Test: ')

    # switch to evaluate mode
    model.eval()

    run_validate(val_loader)
    if args.distributed:
        top1.all_reduce()
        top5.all_reduce()
        losses.all_reduce()  # --- dsq_ext: for TensorBoard

    if args.distributed and (len(val_loader.sampler) * args.world_size < len(val_loader.dataset)):
        aux_val_dataset = Subset(val_loader.dataset,
                                 range(len(val_loader.sampler) * args.world_size, len(val_loader.dataset)))
        aux_val_loader = torch.utils.data.DataLoader(
            aux_val_dataset, batch_size=args.batch_size, shuffle=False,
            num_workers=args.workers, pin_memory=True)
        run_validate(aux_val_loader, len(val_loader))

    progress.display_summary()

    # --- dsq_ext: plain floats (checkpoints, TensorBoard), and the loss too
    return float(top1.avg), {"loss": float(losses.avg), "acc1": float(top1.avg), "acc5": float(top5.avg)}


def save_checkpoint(state, is_best, filename='checkpoint.pth.tar'):
    # --- dsq_ext: written beside the target and renamed over it, so that an
    # interrupted save leaves the previous file intact
    dsq_ext.checkpoint.atomic_save(state, filename)
    if is_best:
        best = os.path.join(os.path.dirname(filename), 'model_best.pth.tar')
        dsq_ext.checkpoint.atomic_copy(filename, best)
    # --- end dsq_ext

class Summary(Enum):
    NONE = 0
    AVERAGE = 1
    SUM = 2
    COUNT = 3

class AverageMeter(object):
    """Computes and stores the average and current value"""
    def __init__(self, name, use_accel, fmt=':f', summary_type=Summary.AVERAGE):
        self.name = name
        self.use_accel = use_accel
        self.fmt = fmt
        self.summary_type = summary_type
        self.reset()

    def reset(self):
        self.val = 0
        self.avg = 0
        self.sum = 0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def all_reduce(self):
        if self.use_accel:
            device = torch.accelerator.current_accelerator()
        else:
            device = torch.device("cpu")
        total = torch.tensor([self.sum, self.count], dtype=torch.float32, device=device)
        dist.all_reduce(total, dist.ReduceOp.SUM, async_op=False)
        self.sum, self.count = total.tolist()
        self.avg = self.sum / self.count

    def __str__(self):
        fmtstr = '{name} {val' + self.fmt + '} ({avg' + self.fmt + '})'
        return fmtstr.format(**self.__dict__)

    def summary(self):
        fmtstr = ''
        if self.summary_type is Summary.NONE:
            fmtstr = ''
        elif self.summary_type is Summary.AVERAGE:
            fmtstr = '{name} {avg:.3f}'
        elif self.summary_type is Summary.SUM:
            fmtstr = '{name} {sum:.3f}'
        elif self.summary_type is Summary.COUNT:
            fmtstr = '{name} {count:.3f}'
        else:
            raise ValueError('invalid summary type %r' % self.summary_type)

        return fmtstr.format(**self.__dict__)


class ProgressMeter(object):
    def __init__(self, num_batches, meters, prefix=""):
        self.batch_fmtstr = self._get_batch_fmtstr(num_batches)
        self.meters = meters
        self.prefix = prefix

    def display(self, batch):
        entries = [self.prefix + self.batch_fmtstr.format(batch)]
        entries += [str(meter) for meter in self.meters]
        print('\t'.join(entries))

    def display_summary(self):
        entries = [" *"]
        entries += [meter.summary() for meter in self.meters]
        print(' '.join(entries))

    def _get_batch_fmtstr(self, num_batches):
        num_digits = len(str(num_batches // 1))
        fmt = '{:' + str(num_digits) + 'd}'
        return '[' + fmt + '/' + fmt.format(num_batches) + ']'

def accuracy(output, target, topk=(1,)):
    """Computes the accuracy over the k top predictions for the specified values of k"""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)

        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))

        res = []
        for k in topk:
            correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
            res.append(correct_k.mul_(100.0 / batch_size))
        return res


# --- dsq_ext: helpers for the fenced additions above ------------------------------
# (written in the repository's style: ruff would format them as they are)
# The reusable machinery (checkpoint files, configs, TensorBoard tags) is in the
# package (dsq_ext.checkpoint, dsq_ext.config, dsq_ext.monitor); these functions only
# map this script's flags onto it.


def check_args(args):
    """Rejects flag combinations that would silently do something else, before any process starts."""
    if not math.isfinite(args.lr) or args.lr < 0:
        parser.error(f"--lr must be a finite number >= 0, got {args.lr}")
    if not args.evaluate and args.epochs <= 0:
        parser.error(f"--epochs must be >= 1 (the number of epochs to train), got {args.epochs}")
    if args.quantize is None:
        given = (
            ("--quan_bit", args.quan_bit),
            ("--quantize_input", args.quantize_input),
            ("--w-bits", args.w_bits),
            ("--a-bits", args.a_bits),
            ("--per-channel", args.per_channel),
            ("--quantize-first-last", args.quantize_first_last),
            ("--bounds", args.bounds),
            ("--alpha-init", args.alpha_init),
            ("--act-percentile", args.act_percentile),
            ("--alpha-lr-scale", args.alpha_lr_scale),
            ("--bounds-lr-scale", args.bounds_lr_scale),
            ("--grid", args.grid),
            ("--[no-]recompute", args.recompute is not None),
        )
        orphans = [flag for flag, value in given if value not in (None, False)]
        if orphans:
            parser.error(
                f"{', '.join(orphans)} only apply with -q/--quantize {{DSQ,uniform}}; "
                "without -q the float model trains"
            )
    elif args.quantize == "uniform" and (args.alpha_init is not None or args.alpha_lr_scale is not None):
        parser.error("--alpha-init and --alpha-lr-scale apply to -q DSQ only (uniform quantization has no alpha)")
    if args.quantize:
        quan_bit = 8 if args.quan_bit is None else args.quan_bit
        args.w_bits = quan_bit if args.w_bits is None else args.w_bits
        if args.a_bits is None and args.quantize_input:
            args.a_bits = quan_bit
        args.quantize_input = args.a_bits is not None
        args.recompute = args.recompute is not False  # on unless --no-recompute
        try:
            quant_config(args)  # what QuantConfig rejects (--grid symmetric at 1 bit), as a usage error
        except ValueError as e:
            parser.error(f"the quantization flags ask for an invalid quantizer: {e}")
        if args.act_percentile is not None and args.a_bits is None:
            parser.error("--act-percentile needs quantized activations (--quantize_input or --a-bits)")

    if args.pretrained:
        if args.init_from:
            parser.error("--pretrained and --init-from both set the starting weights: choose one")
        check_pretrained_cached(args.arch)

    if args.init_from:
        ckpt = read_checkpoint(args.init_from, "--init-from")
        cfg = quant_config_of(ckpt, "--init-from")
        if not cfg.is_float:
            parser.error(
                f"--init-from expects a float checkpoint (written without -q), but {args.init_from} "
                f"was trained with {describe_config(cfg)}; to continue that run use --resume"
            )
        if ckpt.get("arch", args.arch) != args.arch:
            parser.error(f"--init-from {args.init_from} holds a {ckpt['arch']}, not a {args.arch} (-a)")

    if args.resume:
        # A missing file stops the run here, before anything is written to --log_path.
        ckpt = read_checkpoint(args.resume, "--resume")
        theirs, ours = quant_config_of(ckpt, "--resume"), quant_config(args)
        mine, old = _flat(ours.resume_key()), _flat(theirs.resume_key())
        diff = [k for k in {**old, **mine} if mine.get(k) != old.get(k)]
        diff = (["arch"] if ckpt.get("arch") != args.arch else []) + diff
        if diff:
            parser.error(
                f"{args.resume} was written by a different configuration (differs in {', '.join(diff)}):\n"
                f"  checkpoint: -a {ckpt.get('arch')} {describe_config(theirs)}\n"
                f"  this run:   -a {args.arch} {describe_config(ours)}\n"
                "resume with the checkpoint's flags, or start a new run in another --log_path"
            )
    if args.evaluate and args.a_bits is not None and not args.resume:
        parser.error(
            "--evaluate of a model with quantized activations needs a checkpoint (no --resume CHECKPOINT): "
            "activation bounds are set in training and stored in the checkpoint"
        )


def _flat(d, prefix=""):
    # {"weight": {"bits": 4}} -> {"weight.bits": 4}; a float side (None) stays one entry.
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def read_checkpoint(path, flag):
    try:
        return dsq_ext.checkpoint.read_checkpoint(path, flag)
    except dsq_ext.checkpoint.CheckpointError as e:
        parser.error(str(e))


def quant_config_of(ckpt, flag):
    try:
        return dsq_ext.checkpoint.quant_config_of(ckpt, flag)
    except dsq_ext.checkpoint.CheckpointError as e:
        parser.error(str(e))


def check_pretrained_cached(arch):
    # This script never downloads: it uses weights already in torch's hub cache.
    try:
        weights = models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        parser.error(f"--pretrained: torchvision has no pretrained weights for '{arch}'")
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(path):
        parser.error(
            f"--pretrained: the weights of '{arch}' are not in torch's hub cache ({path}) and "
            f"train.py does not download. On a machine with network access, fetch {weights.url} "
            f"into {os.path.dirname(path)} (or point TORCH_HOME at a cache that has it), "
            "or train from scratch without --pretrained"
        )


def quant_config(args):
    """The dsq_ext.ModelQuantConfig these flags ask for (float without -q); checkpoints record it."""
    if not args.quantize:
        return dsq_ext.ModelQuantConfig()
    common = {"method": args.quantize}
    for field in ("bounds", "alpha_init", "alpha_lr_scale", "bounds_lr_scale", "grid"):
        if getattr(args, field) is not None:
            common[field] = getattr(args, field)
    weight, act = dsq_ext.layer_configs(
        w_bits=args.w_bits,
        a_bits=args.a_bits,
        per_channel=args.per_channel,
        act_percentile=args.act_percentile,
        **common,
    )
    keep_float = not args.quantize_first_last
    return dsq_ext.ModelQuantConfig(weight=weight, act=act, skip_first=keep_float, skip_last=keep_float)


def describe_config(cfg):
    """The train.py flags that give a ModelQuantConfig."""
    if cfg.is_float:
        return "(float, no -q)"
    w, a = cfg.weight, cfg.act
    first = w or a
    flags = ["-q", "DSQ" if first.method == "dsq" else "uniform"]
    flags += ["--w-bits", str(w.bits)] if w else []
    flags += ["--a-bits", str(a.bits)] if a else []
    flags += ["--per-channel"] * bool(w and w.per_channel)
    flags += ["--quantize-first-last"] * (not cfg.skip_first)
    flags += ["--bounds", first.bounds]
    if a is not None and a.percentile is not None:
        flags += ["--act-percentile", f"{a.percentile:g}"]
    default = dsq_ext.QuantConfig(method=first.method)
    for flag, field in (("--alpha-lr-scale", "alpha_lr_scale"), ("--bounds-lr-scale", "bounds_lr_scale")):
        if getattr(first, field) != getattr(default, field):
            flags += [flag, f"{getattr(first, field):g}"]
    flags += ["--grid", w.grid if w else first.grid]
    return " ".join(flags)


def local_procs(args, ngpus_per_node):
    if args.multiprocessing_distributed:
        return ngpus_per_node
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def load_float_weights(model, path):
    ckpt = read_checkpoint(path, "--init-from")
    dsq_ext.checkpoint.load_model_state(model, ckpt["state_dict"])
    print(f"=> float weights from '{path}' (epoch {ckpt.get('epoch')}, best Acc@1 {ckpt.get('best_acc1')})")


def print_replica_digest(model, args):
    # Each rank prints its own: replicas stay equal only if every quantizer update
    # (first-batch bounds, moving averages, alpha steps) is the same on all ranks.
    digest = dsq_ext.checkpoint.quantizer_digest(dsq_ext.checkpoint.canonical_state_dict(model))
    digests = [None] * args.world_size
    dist.all_gather_object(digests, digest)
    print(f"=> rank {args.rank}: quantizer state sha256 {digest}", flush=True)
    if args.rank == 0 and len(set(digests)) != 1:
        warnings.warn(f"quantizer state differs across ranks: {digests}", stacklevel=2)


def make_writer(log_path):
    from torch.utils.tensorboard import SummaryWriter  # imported here: only rank 0 writes

    os.makedirs(log_path, exist_ok=True)
    return SummaryWriter(log_dir=log_path)


def log_epoch(writer, epoch, model, train_stats, val_stats, lr):
    for split, stats in (("train", train_stats), ("val", val_stats)):
        for key, value in stats.items():
            writer.add_scalar(f"{split}/{key}", value, epoch)
    writer.add_scalar("lr", lr, epoch)
    dsq_ext.monitor.log_quantizers(writer, model, epoch)
    writer.flush()


def name_unreadable_images(dataset):
    """Makes an ImageFolder's loader say which file it could not read (e.g. a truncated image)."""
    load = dataset.loader

    def loader(path):
        try:
            return load(path)
        except OSError as e:
            raise OSError(f"cannot read image {path}: {e}") from e

    dataset.loader = loader


# --- end dsq_ext


if __name__ == '__main__':
    main()
